"""Scratch (not committed): greedy tokens with PDL on vs off, bf16 and fp8, graphs on."""
import os
import torch
from llama8b_config import LLAMA31_8B, write_checkpoint_dir
from weight_quant_bench import FormatSwitch
from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.kernels import pdl

cfg = {**LLAMA31_8B, "num_hidden_layers": 6}
llm = LLM(str(write_checkpoint_dir(config=cfg)), load_format="dummy", tokenizer="../.tok", max_num_seqs=8,
          max_model_len=1024, kv_cache_memory=2 << 30, warm_up=False, enable_prefix_caching=False)
switch = FormatSwitch(llm.core)
prompts = [list(range(1000 + i * 7, 1000 + i * 7 + 50 + i)) for i in range(6)]
for fmt in ("none", "fp8", "int4"):
    res = {}
    for flag in ("1", "0"):
        os.environ["WATTSERVE_PDL"] = flag
        pdl.pdl_enabled.cache_clear()
        switch.use(fmt)
        llm.core.runner.capture_decode_graphs(8, llm.core.max_model_len)
        single = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        batch = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        res[flag] = [c.token_ids for o in single + batch for c in o.choices]
    same = sum(a == b for a, b in zip(res["1"], res["0"]))
    print(f"{fmt}: PDL on == off for {same}/{len(res['0'])} sequences; first: {res['1'][0][:12]} vs {res['0'][0][:12]}", flush=True)
