"""The engine on CUDA: correctness against HF transformers, batch-1 decode and long prefill.

Llama-3.1-8B shapes with random weights (bf16), measured against the physical limits in the
same run: a device-to-device copy (bandwidth) and a large bf16 matmul (FLOP/s).

  1. correctness: the same weights in HF transformers and in the engine; last-token logits
     of a few prompts and greedy tokens for 32 steps, in float32 (must agree) and in bf16
     (beside HF's own bf16 error). Random Llama-3.1-8B weights, and with --gguf the
     default model (SmolLM2-135M GGUF).
  2. batch-1 decode: short prompt, 256 new tokens; tokens/s and achieved weight bandwidth,
     against weight bytes / copy bandwidth (the roofline).
  3. prefill of one 4096-token prompt: achieved TFLOP/s against the bf16 matmul.

Usage: python benchmarks/gpu_e2e_bench.py [--tokenizer DIR] [--gguf FILE]
"""
from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
from _roofline import (
    copy_bandwidth,
    cuda_time,
    matmul_flops,
    prefill_flops,
    weight_bytes_per_step,
)
from _results import write_results
from llama8b_config import LLAMA31_8B, write_checkpoint_dir

from wattserve.engine.llm import LLM, prompt_logits
from wattserve.engine.loader import load_tokenizer_only
from wattserve.engine.request import SamplingParams


def generate(llm: LLM, prompt: list[int], n: int, min_tokens: int = 0) -> tuple[list[int], float]:
    """Greedy tokens and the seconds of the decode steps (from the prefill's token to the last)."""
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=min_tokens, ignore_eos=not min_tokens)
    (result,) = llm.generate([prompt], params)
    return result.choices[0].token_ids, result.stats.decode_time


def hf_reference(hf, prompts: list[list[int]], steps: int) -> list[tuple[torch.Tensor, list[int]]]:
    """HF's last-token logits (float32) and greedy tokens (EOS masked) for each prompt."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            logits = hf(ids).logits[0, -1].float()
            tokens = hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        out.append((logits, tokens[0, len(prompt):].tolist()))
    return out


def agreement(logits: torch.Tensor, tokens: list[int], ref: tuple[torch.Tensor, list[int]]) -> dict:
    ref_logits, ref_tokens = ref
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(ref_tokens))
    return {"max_rel_logit_error": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
            "greedy_tokens_equal": same}


def engine_outputs(llm: LLM, prompts: list[list[int]], steps: int) -> list[tuple[torch.Tensor, list[int]]]:
    return [(prompt_logits(llm.core, p), generate(llm, p, steps, min_tokens=steps)[0]) for p in prompts]


def dtype_study(make_llm, hf, prompts: list[list[int]], steps: int = 32):
    """Random weights are an ill-conditioned oracle in bf16: their logits are nearly flat, so
    rounding alone flips greedy choices. So the engine is checked in float32 against HF in
    float32 (same function: tiny error, equal tokens), and in bf16 its distance from the
    float32 answer is set beside HF's own bf16 distance from it. `hf` comes in float32 and
    leaves in bf16; returns (results, the bf16 LLM)."""
    ref = hf_reference(hf, prompts, steps)
    llm = make_llm("float32")
    fp32 = [agreement(*o, r) for o, r in zip(engine_outputs(llm, prompts, steps), ref)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    llm = make_llm("bfloat16")
    hf = hf.to(torch.bfloat16)
    results = {
        "prompt_tokens": [len(p) for p in prompts],
        "float32_engine_vs_hf_float32": fp32,
        "bf16_engine_vs_hf_float32": [agreement(*o, r) for o, r in zip(engine_outputs(llm, prompts, steps), ref)],
        "bf16_hf_vs_hf_float32": [agreement(*o, r) for o, r in zip(hf_reference(hf, prompts, steps), ref)],
        "float32_all_greedy_equal": all(r["greedy_tokens_equal"] == steps for r in fp32),
    }
    return results, llm


def dummy_llm(workdir: Path, dtype: str, tokenizer: str | None) -> LLM:
    return LLM(str(workdir), load_format="dummy", dtype=dtype, tokenizer=tokenizer,
               # No prefix caching: the prefill measurement runs one prompt again and again.
               kv_cache_memory=4 << 30, enable_prefix_caching=False,
               max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=8192)


def llama8b_section(args, results: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    workdir = write_checkpoint_dir()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in (7, 100, 531)]
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**LLAMA31_8B)).eval()

    def make_llm(dtype):
        llm = dummy_llm(workdir, dtype, args.tokenizer)
        llm.core.runner.model.load_weights(hf.state_dict().items())
        return llm

    results["llama8b_vs_hf"], llm = dtype_study(make_llm, hf, prompts)
    engine = llm.core
    del hf
    gc.collect()
    torch.cuda.empty_cache()

    read_per_token = weight_bytes_per_step(engine.runner.model)
    bw = copy_bandwidth()
    flops = matmul_flops()
    roofline = bw / read_per_token
    best = 0.0
    for _ in range(3):
        _, seconds = generate(llm, prompts[0], 256)
        best = max(best, 255 / seconds)
    # The GPU's share of a step: one graph replay plus the lm_head, without the host's work.
    graphs, model = engine.runner.graphs, engine.runner.model
    hidden = graphs.hidden[:1]
    gpu_step = cuda_time(lambda: (graphs.graphs[1].replay(), model.compute_logits(hidden)))
    results["batch1_decode"] = {
        "new_tokens": 256, "tok_s": round(best, 1), "roofline_tok_s": round(roofline, 1),
        "fraction_of_roofline": round(best / roofline, 3),
        "achieved_weight_bandwidth_TBps": round(best * read_per_token / 1e12, 3),
        "copy_bandwidth_TBps": round(bw / 1e12, 3), "weight_bytes_read_per_token": read_per_token,
        "gpu_only_step_ms": round(gpu_step * 1e3, 3), "full_step_ms": round(1e3 / best, 3),
        "cuda_graphs": graphs is not None,
    }

    prompt = torch.randint(0, 128000, (4096,), generator=gen).tolist()
    total_flops = prefill_flops(model, engine.model_config, len(prompt))

    def prefill():
        steps = []
        llm.generate([prompt], SamplingParams(max_tokens=1), on_step=steps.append)
        assert len(steps) == 1  # the whole prompt in one step

    seconds = cuda_time(prefill, warmup=2, iters=5)
    results["prefill_4096"] = {
        "seconds": round(seconds, 4), "tflops": round(total_flops / seconds / 1e12, 1),
        "matmul_tflops": round(flops / 1e12, 1), "fraction_of_matmul": round(total_flops / seconds / flops, 3),
        "flops_counted": total_flops,
    }
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()


def default_model_section(args, results: dict) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
                                              dtype=torch.float32).to("cuda").eval()

    def make_llm(dtype):
        return LLM(args.gguf, dtype=dtype, kv_cache_memory=1 << 30)

    tok = load_tokenizer_only(args.gguf)
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in ("What is the capital of France?", "Write a haiku about GPUs.")]
    results["default_model_vs_hf"], _ = dtype_study(make_llm, hf, prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="tokenizer dir for the random-weight model (default: the default model's)")
    ap.add_argument("--gguf", help="the default model's GGUF file, for its correctness check")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_e2e_<gpu>.json)")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    results: dict = {"device": gpu, "torch": torch.__version__, "command": "python benchmarks/gpu_e2e_bench.py"}
    llama8b_section(args, results)
    if args.gguf:
        default_model_section(args, results)
    d, p = results["batch1_decode"], results["prefill_4096"]
    print(f"{'measure':<40}{'value':>12}{'limit':>12}{'fraction':>10}")
    print(f"{'batch-1 decode tok/s (8B, bf16)':<40}{d['tok_s']:>12}{d['roofline_tok_s']:>12}{d['fraction_of_roofline']:>10}")
    print(f"{'  step ms: full / GPU only':<40}{d['full_step_ms']:>12}{d['gpu_only_step_ms']:>12}")
    print(f"{'prefill 4096 TFLOP/s':<40}{p['tflops']:>12}{p['matmul_tflops']:>12}{p['fraction_of_matmul']:>10}")
    for study in ("llama8b_vs_hf", "default_model_vs_hf"):
        if study not in results:
            continue
        print(f"{study:<32}" + "".join(f"{f'{n}-token prompt':>20}" for n in results[study]["prompt_tokens"]))
        for key in ("float32_engine_vs_hf_float32", "bf16_engine_vs_hf_float32", "bf16_hf_vs_hf_float32"):
            cells = [f"{r['max_rel_logit_error']:.1e} {r['greedy_tokens_equal']:>2}/32" for r in results[study][key]]
            print(f"  {key:<30}" + "".join(f"{c:>20}" for c in cells))

    write_results(results, "gpu_e2e", gpu, args.out)


if __name__ == "__main__":
    main()
