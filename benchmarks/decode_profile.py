"""Where a batch-1 decode step's GPU time goes (Llama-3.1-8B shapes, random weights, bf16).

Three views, each set against a device-to-device copy measured in the same run:
  1. the captured decode graph's kernels (torch profiler over replays): time per step by
     kernel, split into matmuls and everything else;
  2. each weight matrix's decode matmul alone, cuBLAS and kernels/triton_gemv.py, weights
     rotated so L2 never holds one, timed as graph replays: bandwidth against the copy;
  3. the engine's full step (host included) against the GPU-only step, and engine tokens/s
     before this profile's changes (cuBLAS for every matmul, rotary and KV write as two
     kernels) and after, each with steps launched ahead of the host (engine/core.py) and not.
With --sweep, the Triton matmul's best of its tile configs instead of its default one.

Usage: python benchmarks/decode_profile.py --tokenizer DIR [--sweep]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from _roofline import copy_bandwidth, cuda_time, graph_time, weight_bytes_per_step
from llama8b_config import write_checkpoint_dir

from wattserve.engine.core import EngineCore
from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.kernels.dispatch import Ops, triton_ops
from wattserve.kernels.triton_gemv import DEFAULT_CONFIG, gemv_triton
from wattserve.kernels.triton_rotary import rotary_then_write_kv

_GEMM_MARKERS = ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "cublas")


def decode_tok_s(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of the decode steps: from the first token (the prefill's) to the last."""
    (result,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return 1 / result.stats.tpot


def use_ops(engine: EngineCore, ops: Ops) -> None:
    for module in engine.runner.model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    engine.runner.capture_decode_graphs(engine.config.scheduler.max_num_seqs, engine.max_model_len)


def before_and_after(llm: LLM, prompt: list[int]) -> list[dict]:
    """Engine tok/s (best of 3) for each ops set, launching ahead and not; leaves the
    engine on the current ops."""
    engine = llm.core
    now = triton_ops()
    before = dataclasses.replace(now, linear=torch.nn.functional.linear, rotary_write_kv=rotary_then_write_kv)
    rows = []
    for name, ops in (("before: cuBLAS, rotary + KV write", before), ("now: decode matmul, fused", now)):
        use_ops(engine, ops)
        for ahead in (False, True):
            engine.launch_ahead = ahead
            tok_s = max(decode_tok_s(llm, prompt, 256) for _ in range(3))
            rows.append({"ops": name, "launch_ahead": ahead, "tok_s": round(tok_s, 1)})
    return rows


def kernel_table(step, steps: int = 20) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name][0] += event.device_time / steps  # us
            per_name[event.name][1] += 1 / steps
    rows = [{"kernel": n[:90], "us_per_step": round(t, 2), "launches_per_step": round(c, 2),
             "gemm": any(m in n.lower() for m in _GEMM_MARKERS)} for n, (t, c) in per_name.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def gemv_table(engine: EngineCore, bw: float, sweep: bool) -> list[dict]:
    """cuBLAS against the Triton decode matmul (its default config, or the best of a sweep)
    on each weight matrix, at 1, 8 and 16 rows."""
    model = engine.runner.model
    layer = model.layers[0]
    mats = {"qkv_proj": layer.self_attn.qkv_proj.weight, "o_proj": layer.self_attn.o_proj.weight,
            "gate_up_proj": layer.mlp.gate_up_proj.weight, "down_proj": layer.mlp.down_proj.weight,
            "lm_head": model.lm_head.weight}
    configs = [DEFAULT_CONFIG]
    if sweep:
        configs += [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8) for st in (3, 4, 5)]
    rows_out = []
    for name, w in mats.items():
        nbytes = w.numel() * w.element_size()
        copies = max(2, -(-(200 << 20) // nbytes))  # rotate past the 50 MB L2
        ws = [w.clone() for _ in range(copies)]
        for m in (1, 8, 16):
            x = torch.randn(m, w.shape[1], device=w.device, dtype=w.dtype)
            cublas = graph_time(lambda i: torch.nn.functional.linear(x, ws[i % copies]))
            best, best_t = None, float("inf")
            for cfg in configs:
                try:
                    t = graph_time(lambda i: gemv_triton(x, ws[i % copies], None, cfg))
                except Exception:  # noqa: BLE001 -- a config out of shared memory or registers
                    continue
                if t < best_t:
                    best, best_t = cfg, t
            rows_out.append({"matrix": name, "rows": m, "cublas_us": round(cublas * 1e6, 2),
                             "cublas_x_copy": round(nbytes / cublas / bw, 3), "triton_best": best,
                             "triton_us": round(best_t * 1e6, 2), "triton_x_copy": round(nbytes / best_t / bw, 3)})
            if sweep:
                print(rows_out[-1], flush=True)
        del ws
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir for the random-weight model")
    ap.add_argument("--sweep", action="store_true", help="sweep the decode matmul's tile configs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(str(write_checkpoint_dir()), load_format="dummy", dtype="bfloat16", tokenizer=args.tokenizer,
              kv_cache_memory=4 << 30, max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=8192)
    engine = llm.core
    bw = copy_bandwidth()
    read = weight_bytes_per_step(engine.runner.model)
    prompt = list(range(1000, 1007))
    variants = before_and_after(llm, prompt)
    tok_s = variants[-1]["tok_s"]
    # Leave a sequence of ~100 tokens in the cache for the graph's attention to read.
    graphs, model = engine.runner.graphs, engine.runner.model
    hidden = graphs.hidden[:1]

    def gpu_step():
        graphs.graphs[1].replay()
        model.compute_logits(hidden)

    gpu_s = cuda_time(gpu_step, warmup=10, iters=50)
    kernels = kernel_table(gpu_step)
    gemm_us = sum(r["us_per_step"] for r in kernels if r["gemm"])
    other_us = sum(r["us_per_step"] for r in kernels if not r["gemm"])
    gemvs = gemv_table(engine, bw, args.sweep)
    gpu = torch.cuda.get_device_name()
    result = {
        "device": gpu, "torch": torch.__version__, "command": "python benchmarks/decode_profile.py --tokenizer DIR",
        "copy_bandwidth_TBps": round(bw / 1e12, 3), "weight_bytes_per_step": read,
        "roofline_tok_s": round(bw / read, 1), "engine_tok_s": round(tok_s, 1), "before_and_after": variants,
        "full_step_ms": round(1e3 / tok_s, 3), "gpu_only_step_ms": round(gpu_s * 1e3, 3),
        "kernel_sum_ms": round((gemm_us + other_us) / 1e3, 3), "gemm_ms": round(gemm_us / 1e3, 3),
        "non_gemm_ms": round(other_us / 1e3, 3), "kernels": kernels, "decode_matmuls": gemvs,
    }
    print(f"copy {result['copy_bandwidth_TBps']} TB/s | roofline {result['roofline_tok_s']} tok/s | "
          f"engine {result['engine_tok_s']} tok/s")
    for v in variants:
        print(f"  {v['ops']:<40} launch ahead {'on ' if v['launch_ahead'] else 'off'} {v['tok_s']:>8} tok/s "
              f"{v['tok_s'] / result['roofline_tok_s']:.3f} of roofline")
    print(f"step ms: full {result['full_step_ms']} | GPU only {result['gpu_only_step_ms']} | kernels "
          f"{result['kernel_sum_ms']} (matmuls {result['gemm_ms']}, other {result['non_gemm_ms']})")
    print(f"{'kernel':<70}{'us/step':>10}{'launches':>10}")
    for r in kernels[:25]:
        print(f"{r['kernel'][:69]:<70}{r['us_per_step']:>10}{r['launches_per_step']:>10}")
    print(f"{'matrix':<14}{'rows':>5}{'cuBLAS us':>11}{'x copy':>8}{'Triton us':>11}{'x copy':>8}  config")
    for r in gemvs:
        print(f"{r['matrix']:<14}{r['rows']:>5}{r['cublas_us']:>11}{r['cublas_x_copy']:>8}{r['triton_us']:>11}"
              f"{r['triton_x_copy']:>8}  {r['triton_best']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_profile_{gpu.replace(' ', '_')}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
