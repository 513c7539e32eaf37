"""Scratch (not committed): greedy tokens with PDL on vs off (graphs on): dense bf16/fp8/int4
over bf16 and int8 KV, and a Qwen3-MoE."""
import os
from llama8b_config import LLAMA31_8B, write_checkpoint_dir
from moe_bench import QWEN3_30B_A3B
from weight_quant_bench import FormatSwitch
import torch
from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.kernels import pdl

prompts = [list(range(1000 + i * 7, 1000 + i * 7 + 50 + i)) for i in range(6)]


def compare(llm, name, before=lambda: None):
    res = {}
    for flag in ("1", "0"):
        os.environ["WATTSERVE_PDL"] = flag
        pdl.pdl_enabled.cache_clear()
        before()
        llm.core.runner.capture_decode_graphs(8, llm.core.max_model_len)
        out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        out += llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        res[flag] = [c.token_ids for o in out for c in o.choices]
    same = sum(a == b for a, b in zip(res["1"], res["0"]))
    print(f"{name}: PDL on == off for {same}/{len(res['0'])} sequences", flush=True)


for kv in () if os.environ.get("MOE_ONLY") else ("auto", "int8"):
    llm = LLM(str(write_checkpoint_dir(config={**LLAMA31_8B, "num_hidden_layers": 6})), load_format="dummy",
              tokenizer="../.tok", max_num_seqs=8, max_model_len=1024, kv_cache_memory=2 << 30, warm_up=False,
              enable_prefix_caching=False, kv_cache_dtype=kv)
    switch = FormatSwitch(llm.core)
    for fmt in ("none", "fp8", "int4") if kv == "auto" else ("none",):
        compare(llm, f"llama {fmt} weights, {kv} KV", lambda: switch.use(fmt))
    del llm, switch
    torch.cuda.empty_cache()
moe = LLM(str(write_checkpoint_dir(config={**QWEN3_30B_A3B, "num_hidden_layers": 4})), load_format="dummy",
          tokenizer="../.tok", max_num_seqs=8, max_model_len=1024, kv_cache_memory=2 << 30, warm_up=False,
          enable_prefix_caching=False)
compare(moe, "qwen3-moe")
