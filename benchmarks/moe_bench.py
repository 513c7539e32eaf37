"""Mixture of experts on random weights: the fused MoE layer, batch-1 decode and offline
throughput of a whole MoE model, each against a limit measured in the same run.

1. Layer: routing and experts, Triton (kernels/triton_moe_routing.py, kernels/triton_moe.py)
   and the PyTorch reference (kernels/moe.py: experts one at a time, as transformers' eager
   loop), from given router logits, at Mixtral-8x7B's layer shape (8 experts, top-2,
   hidden 4096, intermediate 14336) and Qwen3-30B-A3B's (128, top-8, 2048, 768), over token
   counts 1..4096, routed by a random router. The roofline of each point is the larger of
   (bytes of the experts actually routed to + x + output) / copy bandwidth and
   (2 * tokens * top_k * 3 * hidden * intermediate) / matmul rate.
2. Decode: one request on Qwen3-30B-A3B's shapes (`--load-format dummy`, bf16, CUDA graphs):
   output tok/s against the active-weight roofline, copy bandwidth / (every non-expert weight
   but the embedding + top_k of num_experts experts per layer). Target: >= 0.6.
   Beside it, each launch of the step that reads weights or the KV cache timed alone at these
   shapes (benchmarks/_decode_launches.py: the GEMVs by matrix and K split, decode attention
   by split, the fused router, the norm), and the step's kernel table attributed to them.
3. Offline: N requests of P prompt tokens producing O tokens each on the same model, output
   tok/s against the bound of offline_bench.py (prefill FLOPs of the active parameters at the
   matmul rate + O - 1 steps reading the weights of the experts a batch is expected to touch).

On CPU (`--tiny`) every part runs at toy shapes, the layer through Triton's interpreter, so
the script cannot rot; the limits are then the CPU's own copy and fp32 matmul rates.

Usage: python benchmarks/moe_bench.py            (CUDA, the shapes above; --skip-layer: 2 and 3 only)
       python benchmarks/moe_bench.py --tiny     (CPU, end to end in about a minute)
Writes benchmarks/results/moe_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
from _decode_launches import attribute, decode_launch_rows  # noqa: E402
from _results import write_results  # noqa: E402
from _roofline import copy_bandwidth, cuda_time, graph_time, host_time, matmul_flops  # noqa: E402
from decode_profile import kernel_table  # noqa: E402

from wattserve.engine.llm import LLM  # noqa: E402
from wattserve.engine.request import SamplingParams  # noqa: E402
from wattserve.kernels.moe import fused_moe_ref, select_experts  # noqa: E402
from wattserve.kernels.triton_moe import _launch_config, _tiling, fused_moe_triton  # noqa: E402
from wattserve.kernels.triton_interpreter import fix_loop_bounds  # noqa: E402
from wattserve.kernels.triton_moe_routing import select_experts_triton  # noqa: E402

# (name, experts, top_k, hidden, intermediate)
LAYER_SHAPES = [("Mixtral-8x7B", 8, 2, 4096, 14336), ("Qwen3-30B-A3B", 128, 8, 2048, 768)]
TINY_LAYER_SHAPES = [("tiny-8x2", 8, 2, 64, 96), ("tiny-16x4", 16, 4, 32, 48)]
TOKEN_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
TINY_TOKEN_COUNTS = [1, 16]  # one tile per assignment, then sorted tiles

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
TINY_QWEN3_MOE = {**QWEN3_30B_A3B, "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "num_experts": 16, "num_experts_per_tok": 4,
                  "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def time_fn(fn, device: torch.device, iters: int) -> float:
    """Median seconds of fn()."""
    if device.type == "cuda":
        return cuda_time(fn, warmup=3, iters=iters)
    return host_time(fn, warmup=1, iters=iters)


def measure_limits(device: torch.device) -> dict:
    """Copy bytes/s and matmul FLOP/s: bf16 on CUDA (_roofline), fp32 on CPU."""
    copy = copy_bandwidth(device)
    if device.type == "cuda":
        matmul = matmul_flops()
        torch.cuda.empty_cache()
    else:
        a = torch.randn(1024, 1024)
        matmul = 2 * 1024**3 / host_time(lambda: a @ a, iters=5)
    return {"copy_bytes_s": copy, "matmul_flop_s": matmul}


# ---- 1. the layer ---------------------------------------------------------------------------
REPS = 20  # routings per timing: each call routes afresh, so no expert stays in L2 across calls


def layer_inputs(shape, tokens, device, dtype):
    name, experts, top_k, hidden, inter = shape
    gen = torch.Generator(device=device).manual_seed(0)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, device=device, generator=gen) * hidden**-0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, device=device, generator=gen) * inter**-0.5).to(dtype)
    x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
    logits = torch.randn(REPS, tokens, experts, device=device, generator=gen).to(dtype)
    return w_gate_up, w_down, x, logits


def fused_time(fused_layer, device, iters) -> float:
    """The fused layer as a decode graph replays it (CUDA; no host launch cost), or eager."""
    if device.type == "cuda":
        return graph_time(fused_layer, REPS)
    return time_fn(lambda: fused_layer(0), device, iters)


def bench_layer(shape, token_counts, device, dtype, limits, iters) -> list[dict]:
    name, experts, top_k, hidden, inter = shape
    expert_bytes = 3 * hidden * inter * (2 if dtype == torch.bfloat16 else 4)
    rows = []
    for tokens in token_counts:
        w_gate_up, w_down, x, logits = layer_inputs(shape, tokens, device, dtype)

        def fused_layer(i):
            return fused_moe_triton(x, w_gate_up, w_down, *select_experts_triton(logits[i], top_k, True))

        def reference_layer():
            return fused_moe_ref(x, w_gate_up, w_down, *select_experts(logits[0], top_k, True))

        fused, ref = fused_time(fused_layer, device, iters), time_fn(reference_layer, device, iters)
        hit = sum(int(torch.unique(select_experts(lg, top_k, True)[1]).numel()) for lg in logits) / REPS
        moved = hit * expert_bytes + 2 * x.numel() * x.element_size()
        flops = 2 * tokens * top_k * 3 * hidden * inter
        roof = max(moved / limits["copy_bytes_s"], flops / limits["matmul_flop_s"])
        rows.append({"shape": name, "tokens": tokens, "experts_hit": round(hit, 2),
                     "fused_us": round(fused * 1e6, 1), "reference_us": round(ref * 1e6, 1),
                     "roofline_us": round(roof * 1e6, 2), "fused_vs_reference": round(ref / fused, 2),
                     "fused_fraction_of_roofline": round(roof / fused, 3),
                     "fused_TBps": round(moved / fused / 1e12, 3), "fused_TFLOPs": round(flops / fused / 1e12, 2)})
        print(f"{name:<16}{tokens:>6}{hit:>7.1f}{rows[-1]['fused_us']:>12}{rows[-1]['reference_us']:>12}"
              f"{rows[-1]['roofline_us']:>11}{rows[-1]['fused_fraction_of_roofline']:>9.1%}"
              f"{rows[-1]['fused_vs_reference']:>8}x")
    return rows


def sweep_decode_tiles(shape, token_counts, device, dtype) -> list[dict]:
    """--sweep: the fused layer's time over its two kernels' tile configs at decode token
    counts (gate_up swept with down at its default, then down with the best gate_up)."""
    name, experts, top_k, hidden, inter = shape
    grid = [(bn, bk, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (2, 4)]
    rows = []
    for tokens in token_counts:
        w_gate_up, w_down, x, logits = layer_inputs(shape, tokens, device, dtype)
        block_m = _tiling(tokens * top_k, experts)[1]
        best = [_launch_config(block_m, hidden, inter), _launch_config(block_m, inter, hidden)]

        def time_with(configs):
            return fused_time(lambda i: fused_moe_triton(x, w_gate_up, w_down, *select_experts_triton(
                logits[i], top_k, True), configs=configs), device, 1)

        default_us = time_with(tuple(best)) * 1e6
        for which, (k_dim, n_dim) in enumerate(((hidden, inter), (inter, hidden))):
            best_us = float("inf")
            for bn, bk, st in grid:
                config = dict(BLOCK_M=block_m, BLOCK_N=min(bn, triton.next_power_of_2(n_dim)),
                              BLOCK_K=min(bk, triton.next_power_of_2(k_dim)), num_warps=4, num_stages=st)
                trial = list(best)
                trial[which] = config
                try:
                    us = time_with(tuple(trial)) * 1e6
                except triton.runtime.errors.OutOfResources:  # a tile past the shared memory
                    continue
                if us < best_us:
                    best_us, chosen = us, config
            best[which] = chosen
        rows.append({"shape": name, "tokens": tokens, "default_us": round(default_us, 1),
                     "best_us": round(best_us, 1), "gate_up_config": best[0], "down_config": best[1]})
        print(rows[-1], flush=True)
    return rows


# ---- 2 and 3. the model ---------------------------------------------------------------------
def active_weight_bytes(model: torch.nn.Module, experts_hit: float, num_experts: int) -> float:
    """Weight bytes a decode step reads when `experts_hit` of each layer's experts are routed
    to: every other matrix once, no embedding rows (a lookup)."""
    total = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("embed_tokens"):
            continue
        total += size * experts_hit / num_experts if ".experts." in name else size
    return total


def active_layer_params(model: torch.nn.Module, top_k: int, num_experts: int) -> float:
    """Parameters of the layers one token multiplies by: top_k experts of each layer's."""
    return sum(p.numel() * (top_k / num_experts if ".experts." in n else 1)
               for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() >= 2)


def expected_experts_hit(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a layer expects to run for `batch` tokens routed uniformly at random."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def bench_decode(llm: LLM, config: dict, limits: dict, input_len: int, output_len: int) -> dict:
    """tok/s of one request's decode: (generate 1 + N tokens) - (generate 1 token), so the
    prefill falls out."""
    prompt = torch.randint(0, config["vocab_size"], (input_len,), generator=torch.Generator().manual_seed(1)).tolist()

    def seconds(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - start

    seconds(output_len)  # any first-call cost outside the measurement
    decode_s = min(seconds(output_len + 1) for _ in range(2)) - min(seconds(1) for _ in range(2))
    tok_s = output_len / decode_s
    weights = active_weight_bytes(llm.core.runner.model, config["num_experts_per_tok"], config["num_experts"])
    roof = limits["copy_bytes_s"] / weights
    return {"input_len": input_len, "output_tokens": output_len, "decode_tok_s": round(tok_s, 1),
            "active_weight_bytes": int(weights), "roofline_tok_s": round(roof, 1),
            "fraction_of_roofline": round(tok_s / roof, 3)}


def bench_offline(llm: LLM, config: dict, limits: dict, num_requests: int, input_len: int,
                  output_len: int) -> dict:
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, config["vocab_size"], (num_requests, input_len), generator=gen).tolist()
    start = time.perf_counter()
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    seconds = time.perf_counter() - start
    produced = sum(len(r.choices[0].token_ids) for r in results)
    assert produced == num_requests * output_len, produced
    model, e, k = llm.core.runner.model, config["num_experts"], config["num_experts_per_tok"]
    # Every prompt token through the layers, the lm_head for each prompt's last one.
    flops = num_requests * 2 * (input_len * active_layer_params(model, k, e)
                                + config["hidden_size"] * config["vocab_size"])
    prefill_s = flops / limits["matmul_flop_s"]
    step_bytes = active_weight_bytes(model, expected_experts_hit(e, k, num_requests), e)
    decode_s = (output_len - 1) * step_bytes / limits["copy_bytes_s"]
    bound = produced / (prefill_s + decode_s)
    return {"num_requests": num_requests, "input_len": input_len, "output_len": output_len,
            "seconds": round(seconds, 3), "output_tok_s": round(produced / seconds, 1),
            "bound_output_tok_s": round(bound, 1), "fraction_of_bound": round(produced / seconds / bound, 3)}


def decode_kernels(llm: LLM) -> list[dict]:
    """GPU time per batch-1 decode step by kernel (the captured graph plus the lm_head), the
    largest first: where the step's time goes beside the weights' stream."""
    graphs, model = llm.core.runner.graphs, llm.core.runner.model

    def gpu_step():
        graphs.graphs[1].replay()
        model.compute_logits(graphs.hidden[:1])

    rows = kernel_table(gpu_step)
    print(f"decode step on the GPU: {sum(r['us_per_step'] for r in rows):.1f} us, "
          f"{sum(r['launches_per_step'] for r in rows):.0f} launches of {len(rows)} kernels; largest:")
    for r in rows[:12]:
        print(f"  {r['us_per_step']:>9.1f} us {r['launches_per_step']:>6.0f}x  {r['kernel'][:80]}")
    return rows


def split_step(llm: LLM, decode: dict, kernel_rows: list[dict]) -> dict:
    """The engine's decode step (1 / tok/s) against the GPU's: the graph replay and the lm_head
    timed end to end, and the sum of their kernels' durations. replay - kernels: the gaps
    between kernels inside the graph (what PDL shortens); step - replay: the host's part."""
    graphs, model = llm.core.runner.graphs, llm.core.runner.model
    replay_s = cuda_time(lambda: (graphs.graphs[1].replay(), model.compute_logits(graphs.hidden[:1])))
    out = {"step": 1e6 / decode["decode_tok_s"], "replay_and_logits": replay_s * 1e6,
           "kernels": sum(r["us_per_step"] for r in kernel_rows)}
    out = {k: round(v, 1) for k, v in out.items()}
    print(f"decode step {out['step']} us; its graph and lm_head {out['replay_and_logits']} us; "
          f"their kernels {out['kernels']} us")
    return out


def build_llm(config: dict, device: torch.device, max_num_seqs: int, max_model_len: int,
              tokenizer: str | None) -> LLM:
    directory = Path(tempfile.mkdtemp())
    (directory / "config.json").write_text(json.dumps(config))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    return LLM(str(directory), load_format="dummy", dtype=dtype, device=device.type, tokenizer=tokenizer,
               max_num_seqs=max_num_seqs, max_model_len=max_model_len,
               kv_cache_memory=None if device.type == "cuda" else 64 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy shapes (for CPU)")
    ap.add_argument("--num-requests", type=int, default=64, help="offline: requests")
    ap.add_argument("--input-len", type=int, default=256, help="offline and decode: prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="offline and decode: output tokens")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the default model's)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the layer's tile configs at decode sizes")
    ap.add_argument("--skip-layer", action="store_true", help="decode and offline only (part 1 left out)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/moe_<device>.json)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        fix_loop_bounds()  # the split decode GEMV's K loop (kernels/triton_interpreter.py)
    if args.tiny:
        args.num_requests, args.input_len, args.output_len = 4, 16, 8
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    limits = measure_limits(device)
    print(f"{label}: copy {limits['copy_bytes_s'] / 1e12:.3f} TB/s, matmul {limits['matmul_flop_s'] / 1e12:.3f} TFLOP/s")
    results = {"benchmark": "moe", "device": label, "torch": torch.__version__, "tiny": args.tiny,
               "command": "python " + " ".join(sys.argv), **limits}

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.skip_layer:
        print(f"{'layer':<16}{'tokens':>6}{'hit':>5}{'fused us':>12}{'ref us':>12}{'roof us':>11}{'of roof':>9}{'vs ref':>9}")
        results["layer"] = [row for shape in (TINY_LAYER_SHAPES if args.tiny else LAYER_SHAPES)
                            for row in bench_layer(shape, TINY_TOKEN_COUNTS if args.tiny else TOKEN_COUNTS,
                                                   device, dtype, limits, iters=1 if args.tiny else 20)]
    if args.sweep:
        results["decode_tile_sweep"] = [row for shape in (TINY_LAYER_SHAPES if args.tiny else LAYER_SHAPES)
                                        for row in sweep_decode_tiles(shape, (1, 4) if args.tiny else (1, 2, 4, 8),
                                                                      device, dtype)]
    if device.type == "cuda":
        torch.cuda.empty_cache()

    config = TINY_QWEN3_MOE if args.tiny else QWEN3_30B_A3B
    max_model_len = args.input_len + args.output_len + 1
    results["decode_launches"] = decode_launch_rows(config, args.input_len + args.output_len // 2, max_model_len,
                                                    device, limits["copy_bytes_s"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    llm = build_llm(config, device, max_num_seqs=args.num_requests,
                    max_model_len=max_model_len, tokenizer=args.tokenizer)
    results["model"] = "tiny Qwen3-MoE" if args.tiny else "Qwen3-30B-A3B shapes"
    results["decode_batch_1"] = d = bench_decode(llm, config, limits, args.input_len, args.output_len)
    print(f"batch-1 decode, {results['model']}: {d['decode_tok_s']} tok/s, roofline {d['roofline_tok_s']} "
          f"({d['active_weight_bytes'] / 1e9:.2f} GB active weights) -> {d['fraction_of_roofline']:.0%}")
    if device.type == "cuda":
        results["decode_kernels"] = decode_kernels(llm)
        results["decode_step_us"] = split_step(llm, d, results["decode_kernels"])
        print("the step's kernels against their launches alone:")
        results["decode_attribution"] = attribute(results["decode_launches"], results["decode_kernels"],
                                                  config["num_hidden_layers"])
    results["offline"] = o = bench_offline(llm, config, limits, args.num_requests, args.input_len, args.output_len)
    print(f"offline {o['num_requests']} x {o['input_len']} -> {o['output_len']}: {o['output_tok_s']} output tok/s, "
          f"bound {o['bound_output_tok_s']} -> {o['fraction_of_bound']:.0%}")
    write_results(results, "moe", label, args.out)


if __name__ == "__main__":
    main()
