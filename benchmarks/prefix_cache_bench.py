"""Prefix caching on a shared system prompt: N requests of the same P-token prefix and a
distinct Q-token question each, all submitted at once to the engine (no HTTP), run with the
cache and without it on the same engine settings. Per request, TTFT (arrival to first token);
per run, the prefill time (first arrival to the last first token) and the tokens the model
actually processed.

The run without the cache is the peer. The limits: what the cache can save at best, the
prompt tokens over the tokens it leaves to compute (the first request's whole prompt, then
every question), and on CUDA, each run's prefill FLOPs at the bf16 matmul rate measured in the
same run.

CPU: the default model in float32. CUDA: Llama-3.1-8B shapes with random weights in bf16
(`--load-format dummy` without --model). Synthetic prompts: random token ids, seeded.

Usage: python benchmarks/prefix_cache_bench.py [--device cuda] [--load-format dummy]
       [--tokenizer DIR] [--num-requests 64] [--prefix-len 2048] [--question-len 64]
Writes benchmarks/results/prefix_cache_<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
from _roofline import matmul_flops, prefill_flops  # benchmarks/ is the script's directory
from _results import write_results
from llama8b_config import write_checkpoint_dir

from wattserve.engine.config import SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.engine.stats import StatsObserver, StepStats
from wattserve.server.cli import parse_size

# The warm-up runs on other tokens, so it caches nothing the measured run can use. On CUDA it
# is the whole workload: Triton compiles a kernel per class of arguments (a batch of 1, a batch
# divisible by 16, ...), which must not happen inside a measured step. On CPU nothing compiles.
CPU_WARMUP_REQUESTS = 2


class StepRecorder(StatsObserver):
    def __init__(self):
        self.steps: list[StepStats] = []

    def on_step(self, step: StepStats) -> None:
        self.steps.append(step)


def workload(args, vocab_size: int, seed: int, num_requests: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab_size, (args.prefix_len,), generator=gen).tolist()
    questions = torch.randint(0, vocab_size, (num_requests, args.question_len), generator=gen).tolist()
    return [prefix + q for q in questions]


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    recorder = StepRecorder()
    llm.core.observers.append(recorder)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    requests = [r.stats for r in llm.generate(prompts, params)]
    llm.core.observers.remove(recorder)
    steps = recorder.steps
    assert all(r.generation_tokens == max_tokens for r in requests)
    ttfts = sorted(r.ttft for r in requests)
    busy = [s.gpu_busy_s for s in steps if s.gpu_busy_s is not None]
    return {
        "mean_ttft_s": round(statistics.fmean(ttfts), 4),
        "p50_ttft_s": round(ttfts[len(ttfts) // 2], 4),
        "p90_ttft_s": round(ttfts[int(len(ttfts) * 0.9)], 4),
        "max_ttft_s": round(ttfts[-1], 4),
        "prefill_s": round(max(r.first_token_time for r in requests) - min(r.arrival_time for r in requests), 4),
        "steps": len(steps),
        "step_s": round(sum(s.end - s.start for s in steps), 4),
        "gpu_busy_s": round(sum(busy), 4) if busy else None,
        "tokens_processed": sum(s.num_scheduled_tokens for s in steps),
        "prefix_cache_queries": sum(s.prefix_cache_queries for s in steps),
        "prefix_cache_hits": sum(s.prefix_cache_hits for s in steps),
    }


def build_llm(args, device: str, prefix_caching: bool) -> LLM:
    model = args.model
    if model is None and args.load_format == "dummy":
        model = str(write_checkpoint_dir())  # Llama-3.1-8B shapes
    return LLM(model, load_format=args.load_format, device=device, tokenizer=args.tokenizer,
               kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=prefix_caching,
               max_num_seqs=args.num_requests, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.prefix_len + args.question_len + args.max_tokens)


def ideal_tokens_ratio(args, block_size: int) -> float:
    """Prompt tokens over those the cache leaves to compute: the first prompt whole, then each
    request's tokens past the prefix's full blocks. The most the cache can save."""
    prompt_len = args.prefix_len + args.question_len
    rest = prompt_len - args.prefix_len // block_size * block_size
    return round(args.num_requests * prompt_len / (prompt_len + (args.num_requests - 1) * rest), 2)


def describe(engine: EngineCore, args, matmul: float | None) -> dict:
    """The engine's settings, and on CUDA the prefill time of the FLOPs each run must do at
    the measured matmul rate: without the cache every prompt; with it the first prompt whole,
    then each request's tokens past its cached blocks, attending over them."""
    about = {"model": engine.model_name, "dtype": str(engine.dtype).removeprefix("torch."),
             "block_size": engine.kv.block_size, "kv_cache_blocks": engine.kv.pool.num_blocks, "bound": None}
    if matmul is not None:
        def flops(n: int) -> float:
            return prefill_flops(engine.runner.model, engine.model_config, n)

        prompt_len = args.prefix_len + args.question_len
        cached = args.prefix_len // engine.kv.block_size * engine.kv.block_size
        with_cache = flops(prompt_len) + (args.num_requests - 1) * (flops(prompt_len) - flops(cached))
        about["bound"] = {"matmul_tflops": round(matmul / 1e12, 1),
                          "no_cache_prefill_s": round(args.num_requests * flops(prompt_len) / matmul, 4),
                          "prefix_cache_prefill_s": round(with_cache / matmul, 4)}
    return about


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", help="model path or id (default: the default model, or with --load-format "
                                    "dummy, Llama-3.1-8B shapes)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors", "dummy"])
    ap.add_argument("--tokenizer", help="tokenizer dir for a random-weight model (default: the default model's)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=2048, help="tokens of the shared system prompt")
    ap.add_argument("--question-len", type=int, default=64, help="distinct tokens after it, per request")
    ap.add_argument("--max-tokens", type=int, default=1, help="output tokens per request")
    ap.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig().max_num_batched_tokens)
    ap.add_argument("--kv-cache-memory", type=parse_size, help="bytes for the KV cache (default: the engine's rule)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/prefix_cache_<device>.json)")
    args = ap.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    label = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    # Measured before any engine holds memory, then handed back for the KV cache.
    matmul = matmul_flops() if device == "cuda" else None
    runs = {}
    for name, prefix_caching in (("no_cache", False), ("prefix_cache", True)):
        llm = build_llm(args, device, prefix_caching)
        vocab = llm.core.model_config.vocab_size
        warmup = args.num_requests if device == "cuda" else CPU_WARMUP_REQUESTS
        run(llm, workload(args, vocab, seed=1, num_requests=warmup), args.max_tokens)
        runs[name] = run(llm, workload(args, vocab, seed=0, num_requests=args.num_requests), args.max_tokens)
        about = describe(llm.core, args, matmul)
        print(name, runs[name], flush=True)
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the next engine sizes its KV cache to the memory left free
    plain, cached = runs["no_cache"], runs["prefix_cache"]
    results = {
        "benchmark": "prefix_cache", "device": label, "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, **about, "command": "python " + " ".join(sys.argv),
        "num_requests": args.num_requests, "prefix_len": args.prefix_len, "question_len": args.question_len,
        "max_tokens": args.max_tokens, "max_num_batched_tokens": args.max_num_batched_tokens,
        "runs": runs,
        "mean_ttft_speedup": round(plain["mean_ttft_s"] / cached["mean_ttft_s"], 2),
        "prefill_speedup": round(plain["prefill_s"] / cached["prefill_s"], 2),
        "tokens_processed_ratio": round(plain["tokens_processed"] / cached["tokens_processed"], 2),
        "ideal_tokens_ratio": ideal_tokens_ratio(args, about["block_size"]),
    }

    print(f"\n{args.num_requests} requests x ({args.prefix_len} shared + {args.question_len} own) prompt tokens, "
          f"{results['model']} ({results['dtype']}) on {label}")
    print(f"{'run':<14}{'mean TTFT s':>12}{'p90 TTFT s':>12}{'prefill s':>11}{'tokens run':>12}{'hits':>9}")
    for name, r in runs.items():
        print(f"{name:<14}{r['mean_ttft_s']:>12.3f}{r['p90_ttft_s']:>12.3f}{r['prefill_s']:>11.3f}"
              f"{r['tokens_processed']:>12}{r['prefix_cache_hits']:>9}")
    print(f"mean TTFT {results['mean_ttft_speedup']}x lower, prefill {results['prefill_speedup']}x faster; "
          f"{results['tokens_processed_ratio']}x fewer tokens run (at most {results['ideal_tokens_ratio']}x)")
    if results["bound"]:
        b = results["bound"]
        print(f"prefill at {b['matmul_tflops']} TFLOP/s would take {b['no_cache_prefill_s']} s without the "
              f"cache, {b['prefix_cache_prefill_s']} s with it")
    write_results(results, "prefix_cache", label, args.out)


if __name__ == "__main__":
    main()
