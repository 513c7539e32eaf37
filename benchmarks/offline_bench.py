"""The engine without HTTP on one fixed batch: N requests of P random prompt tokens that each
produce exactly O tokens (greedy, ignore_eos), submitted together and stepped until all finish.

On CUDA, Llama-3.1-8B shapes with random weights in bf16, set in the same run against
  - the physical bound: every prompt's prefill FLOPs at the measured bf16 matmul rate, plus
    O - 1 decode steps (the first output token comes out of the prefill) that each read the
    weights once at the measured copy bandwidth. KV cache reads and decode FLOPs are left out,
    so no engine can reach it;
  - with --hf-peer, HF transformers' continuous batching (`generate_batch`) on the same weights.
On CPU, the default model in float32, and with --hf-peer HF's generate_batch on the same
dequantized weights; no bound (its probes are CUDA's).

Both sides are timed from the first request submitted to the last token; HF's manager start-up
and shut-down (seconds even on CPU) fall outside where transformers records request times,
inside otherwise (`wall_seconds` has them). HF runs a short warm-up first; the engine warms
itself up when it starts (engine/warmup.py). --repeat 2 runs the batch twice (fresh prompts each
time, so the prefix cache serves none) and reports each run: the first is the first batch a
server sees after it starts, so on a GPU it shows what compiling on the way still costs
(with --no-warm-up, what the warm-up saves).

Usage: python benchmarks/offline_bench.py [--num-requests 256] [--input-len 512]
       [--output-len 128] [--hf-peer] [--tokenizer DIR] [--repeat 2] [--no-warm-up]
Writes benchmarks/results/offline_<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass

import torch
import transformers
from _roofline import copy_bandwidth, matmul_flops, prefill_flops, weight_bytes_per_step
from _results import write_results
from llama8b_config import LLAMA31_8B, write_checkpoint_dir
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

from wattserve.engine.core import EngineCore
from wattserve.engine.llm import LLM
from wattserve.engine.loader import default_model_path
from wattserve.engine.request import SamplingParams
from wattserve.engine.stats import StatsObserver, StepStats
from wattserve.server.cli import parse_size

HF_WARMUP_OUTPUT_LEN = 2  # enough to run the prefill shapes and a mixed step before timing


@dataclass
class StepTotals(StatsObserver):
    """Step wall time and, on CUDA, GPU time of the forward passes, over a run."""

    steps: int = 0
    seconds: float = 0.0
    gpu_busy_s: float | None = None
    preemptions: int = 0

    def on_step(self, step: StepStats) -> None:
        self.steps += 1
        self.preemptions += step.num_preemptions
        self.seconds += step.end - step.start
        if step.gpu_busy_s is not None:
            self.gpu_busy_s = (self.gpu_busy_s or 0.0) + step.gpu_busy_s


def run_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    totals = StepTotals()
    llm.core.observers.append(totals)
    start = time.perf_counter()
    produced = sum(len(r.choices[0].token_ids) for r in llm.generate(prompts, params))
    seconds = time.perf_counter() - start
    llm.core.observers.remove(totals)
    expect_tokens("wattserve", produced, len(prompts) * output_len)
    busy = totals.gpu_busy_s
    return {
        "seconds": round(seconds, 3), "output_tokens": produced,
        "output_tok_s": round(produced / seconds, 1),
        "total_tok_s": round((produced + sum(map(len, prompts))) / seconds, 1),
        "steps": totals.steps, "preemptions": totals.preemptions,
        "gpu_idle_fraction_of_step_time": None if busy is None else round(1 - busy / totals.seconds, 4),
    }


def run_hf(model, prompts: list[list[int]], output_len: int, batching: dict) -> dict:
    """`batching`: extra generate_batch arguments (see hf_batching)."""
    def config(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1)  # -1: never stop early

    model.generate_batch(inputs=prompts[:2], generation_config=config(HF_WARMUP_OUTPUT_LEN), **batching)
    start = time.perf_counter()
    outputs = list(model.generate_batch(inputs=prompts, generation_config=config(output_len), **batching).values())
    wall = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outputs)
    expect_tokens("HF generate_batch", produced, len(prompts) * output_len)
    try:  # request times, where this transformers keeps them (5.x GenerationOutput)
        seconds = max(o.lifespan[1] for o in outputs) - min(o.created_time for o in outputs)
    except AttributeError:
        seconds = wall
    return {"seconds": round(seconds, 3), "wall_seconds": round(wall, 3), "output_tokens": produced,
            "output_tok_s": round(produced / seconds, 1),
            "total_tok_s": round((produced + sum(map(len, prompts))) / seconds, 1)}


def hf_batching(device: torch.device, args) -> dict:
    """On a GPU, HF sizes its KV cache to the free memory, as we do. On CPU it would size it, and
    an attention mask, to the host's memory: gigabytes and tens of seconds to fill on a 24 GB
    machine; there it gets the cache the work needs and our step's token budget."""
    if device.type == "cuda":
        return {}
    from transformers import ContinuousBatchingConfig

    page = ContinuousBatchingConfig().page_size
    blocks = args.num_requests * -(-(args.input_len + args.output_len) // page)
    return {"continuous_batching_config": ContinuousBatchingConfig(
        num_blocks=blocks, max_batch_tokens=args.max_num_batched_tokens)}


def expect_tokens(who: str, produced: int, expected: int) -> None:
    if produced != expected:
        raise SystemExit(f"{who} produced {produced} output tokens, not {expected}: the comparison would be unfair")


def physical_bound(engine: EngineCore, num_requests: int, input_len: int, output_len: int,
                   matmul: float, copy: float) -> dict:
    model = engine.runner.model
    flops = num_requests * prefill_flops(model, engine.model_config, input_len)
    weight_bytes = weight_bytes_per_step(model)
    prefill_s = flops / matmul
    decode_s = (output_len - 1) * weight_bytes / copy
    return {"matmul_tflops": round(matmul / 1e12, 1), "copy_bandwidth_TBps": round(copy / 1e12, 3),
            "prefill_flops": flops, "prefill_s": round(prefill_s, 4),
            "weight_bytes_per_decode_step": weight_bytes, "decode_steps": output_len - 1,
            "decode_s": round(decode_s, 4),
            "output_tok_s": round(num_requests * output_len / (prefill_s + decode_s), 1)}


def build(args, device: torch.device):
    """The LLM and, with --hf-peer, HF's model with the same weights (on the same device)."""
    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_model_len=args.input_len + args.output_len, kv_cache_memory=args.kv_cache_memory,
                   quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if device.type == "cpu":
        llm = LLM(device="cpu", warm_up=args.warm_up, **options)
        path = default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval() if args.hf_peer else None
        return llm, hf
    hf = None
    if args.hf_peer:
        torch.manual_seed(args.seed)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA31_8B), dtype=torch.bfloat16).eval()
    llm = LLM(str(write_checkpoint_dir()), load_format="dummy", dtype="bfloat16", device=str(device),
              tokenizer=args.tokenizer, seed=args.seed, warm_up=args.warm_up, **options)
    if hf is not None:
        llm.core.runner.model.load_weights(hf.state_dict().items())
    return llm, hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens per request, exactly")
    ap.add_argument("--hf-peer", action="store_true", help="also run HF transformers' generate_batch")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-memory", type=parse_size,
                    help="bytes for the KV cache, e.g. 24GiB (default: the engine's rule)")
    ap.add_argument("--tokenizer", help="CUDA: tokenizer dir for the random-weight model (default: the default model's)")
    ap.add_argument("--quantization", default="auto",
                    help="weight format, as `wattserve serve --quantization` (fp8, int4: at load)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="as `wattserve serve --kv-cache-dtype`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the batch this many times in the process; the last run is compared")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                    help="start the engine without its warm-up (engine/warmup.py)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/offline_<device>.json)")
    args = ap.parse_args()
    if args.hf_peer and args.quantization not in ("auto", "none"):
        ap.error("--hf-peer copies HF's dense weights in: run it without --quantization")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    limits = None
    if device.type == "cuda":  # measured before the models hold memory, then handed back for the KV cache
        limits = (matmul_flops(), copy_bandwidth())
        torch.cuda.empty_cache()
    llm, hf = build(args, device)
    engine = llm.core
    gen = torch.Generator().manual_seed(args.seed)
    # Prompts of its own for each run: the prefix cache would serve a repeated one.
    batches = torch.randint(0, engine.model_config.vocab_size, (args.repeat, args.num_requests, args.input_len),
                            generator=gen).tolist()
    prompts = batches[-1]
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: dict = {
        "benchmark": "offline", "device": label, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "model": engine.model_name,
        "dtype": str(engine.dtype).removeprefix("torch."), "command": "python " + " ".join(sys.argv),
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
        "kv_cache_tokens": engine.kv.pool.num_blocks * engine.kv.block_size,
    }
    results["repeat"], results["warm_up"] = args.repeat, args.warm_up
    results["wattserve_runs"] = runs = [run_engine(llm, batch, args.output_len) for batch in batches]
    results["wattserve"] = ours = runs[-1]
    if len(runs) > 1:
        results["first_vs_last_output_tok_s"] = round(runs[0]["output_tok_s"] / ours["output_tok_s"], 3)
    results["bound"] = None if limits is None else physical_bound(
        engine, args.num_requests, args.input_len, args.output_len, *limits)
    del llm, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # HF's cache sizes itself to the memory left free
    results["hf_generate_batch"] = None if hf is None else run_hf(hf, prompts, args.output_len, hf_batching(device, args))
    bound, peer = results["bound"], results["hf_generate_batch"]
    results["fraction_of_bound"] = None if bound is None else round(ours["output_tok_s"] / bound["output_tok_s"], 3)
    results["vs_hf"] = None if peer is None else round(ours["output_tok_s"] / peer["output_tok_s"], 2)

    print(f"{args.num_requests} requests x {args.input_len} prompt tokens -> {args.output_len} output tokens, "
          f"{results['model']} ({results['dtype']}) on {label}")
    print(f"{'run':<34}{'output tok/s':>14}{'total tok/s':>13}{'seconds':>10}")
    named = [(f"wattserve run {i + 1}" if len(runs) > 1 else "wattserve", r) for i, r in enumerate(runs)]
    for name, r in (*named, ("HF transformers generate_batch", peer)):
        if r is not None:
            print(f"{name:<34}{r['output_tok_s']:>14}{r['total_tok_s']:>13}{r['seconds']:>10}")
    if bound is not None:
        print(f"{'physical bound':<34}{bound['output_tok_s']:>14}{'':>13}{bound['prefill_s'] + bound['decode_s']:>10.3f}")
        print(f"wattserve at {results['fraction_of_bound']:.0%} of the bound (prefill {bound['prefill_s']} s at "
              f"{bound['matmul_tflops']} TFLOP/s + {bound['decode_steps']} steps at {bound['copy_bandwidth_TBps']} TB/s)")
    if len(runs) > 1:
        print(f"first run at {results['first_vs_last_output_tok_s']:.1%} of the last run's output tok/s")
    if peer is not None:
        print(f"wattserve / HF: {results['vs_hf']}x")
    print(f"preemptions: {ours['preemptions']}")
    if ours["gpu_idle_fraction_of_step_time"] is not None:
        print(f"GPU idle share of step time: {ours['gpu_idle_fraction_of_step_time']:.1%} over {ours['steps']} steps")
    write_results(results, "offline", label, args.out)


if __name__ == "__main__":
    main()
