"""Answer quality and capacity of each quantized KV cache dtype, on the real default model.

Quality: perplexity over a fixed text that ships with Python (the `pydoc_data.topics`
documentation strings, >= 20k tokens), and the KL divergence of every next-token
distribution against the unquantized cache, for every --kv-cache-dtype. The text is cut into
windows, all scored together as one batch, in one of two ways:
- decode (default): token by token (teacher forcing), as a served request's decode steps
  see the cache: every earlier token read back from the quantized cache, and for the KIVI
  formats the positions in the sequence's full-precision ring (kernels/kv_format.py);
- prefill: in chunks, each chunk written to the cache before attention reads it back, so
  whole blocks are quantized before their own tokens attend to them (the harsher case).

Capacity: tokens held per GiB of KV memory, scales and zero points included, for the default
model and for Llama-3.1-8B shapes; also with the int4/int2 per-sequence rings
counted, as a share of 4k-token sequences.

Usage: python benchmarks/kv_quality_bench.py [--tokens 20480] [--window 2048] [--chunk 256]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wattserve.engine.core import EngineCore
from wattserve.engine.llm import LLM
from wattserve.engine.step_input import StepInput
from wattserve.kernels.kv_format import (
    KV_CACHE_DTYPES,
    bytes_per_block,
    bytes_per_ring,
    default_block_size,
    kv_format,
)

RESULTS = Path(__file__).parent / "results"
GOALS = {"fp8_e4m3": 0.5, "int8": 0.5, "int4": 3.0, "int2": 10.0}  # max perplexity increase, %
CAPACITY_GOALS = {"fp8_e4m3": 1.9, "int8": 1.9, "int4": 3.5, "int2": 6.0}  # x bf16 tokens per GiB
SEQUENCE_TOKENS = 4096  # the sequence length the rings' share of capacity is shown at
SHAPES = {  # layers, kv heads, head dim
    "SmolLM2-135M": (30, 3, 64),
    "Llama-3.1-8B": (32, 8, 128),
}


def corpus_tokens(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text)
    if len(ids) < n:
        raise SystemExit(f"pydoc_data.topics has {len(ids)} tokens, fewer than --tokens {n}")
    return ids[:n]


@torch.inference_mode()
def steps_logprobs(engine: EngineCore, windows: list[list[int]], chunk: int):
    """Yield, per step, log-probabilities [windows, chunk, vocab] of the token after each of
    the step's positions, run through the engine's paged cache (its KV dtype); the cache is
    freed at the end."""
    runner, kv = engine.runner, engine.kv
    seq_ids = [-1 - i for i in range(len(windows))]  # no Sequence's: theirs count up from 0
    length = len(windows[0])
    try:
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            for seq_id in seq_ids:
                kv.allocate(seq_id, start + n)
            inputs = StepInput(token_ids=[t for ids in windows for t in ids[start : start + n]],
                               starts=[start] * len(windows), num_new=[n] * len(windows),
                               tables=[kv.tables[i] for i in seq_ids], samples=[False] * len(windows),
                               rings=[kv.ring(i) for i in seq_ids] if kv.uses_rings else None)
            input_ids, positions, meta, _ = runner._prepare(inputs)
            hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
            logits = runner.model.compute_logits(hidden).float().view(len(windows), n, -1)
            yield F.log_softmax(logits, dim=-1)
    finally:
        for seq_id in seq_ids:
            kv.free(seq_id)


def capacity_table() -> dict:
    table = {}
    for model, (layers, heads, dim) in SHAPES.items():
        base = bytes_per_block(kv_format("auto"), 16, heads, dim, torch.bfloat16) / 16
        rows = {}
        for name in KV_CACHE_DTYPES:
            fmt, bs = kv_format(name), default_block_size(name)
            per_token = layers * bytes_per_block(fmt, bs, heads, dim, torch.bfloat16) / bs
            residual = layers * bytes_per_ring(fmt, bs, heads, dim, torch.bfloat16)
            gib = 2**30
            tokens = gib / per_token
            # int4/int2: each sequence also holds a ring; spread over a 4k-token sequence.
            with_residual = gib / (per_token + residual / SEQUENCE_TOKENS)
            rows[name] = {
                "block_size": bs, "bytes_per_token": per_token, "tokens_per_gib": int(tokens),
                "x_bf16": tokens / (gib / (layers * base)),
                "residual_bytes_per_sequence": residual,
                "tokens_per_gib_in_4k_sequences": int(with_residual),
                "x_bf16_in_4k_sequences": with_residual / (gib / (layers * base)),
            }
        table[model] = rows
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20480, help="tokens of pydoc_data.topics to score")
    parser.add_argument("--window", type=int, default=2048, help="tokens per independent window")
    parser.add_argument("--mode", choices=("decode", "prefill"), default="decode",
                        help="decode: token by token, as served; prefill: in chunks of --chunk")
    parser.add_argument("--chunk", type=int, default=256, help="prefill mode: tokens per chunk")
    parser.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda if available)")
    parser.add_argument("--kv-memory", type=int, default=1 << 30, help="KV cache bytes per engine")
    parser.add_argument("--dtypes", default=",".join(KV_CACHE_DTYPES), help="KV dtypes, auto first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    assert dtypes[0] == "auto", "the unquantized cache is the reference: list it first"

    chunk = 1 if args.mode == "decode" else args.chunk
    engines = {}
    for name in dtypes:
        # Eager: the scoring loop drives the model directly, never the decode graphs.
        engines[name] = LLM(device=args.device, enforce_eager=True, kv_cache_dtype=name, kv_cache_memory=args.kv_memory,
                            max_num_seqs=args.tokens // args.window, max_model_len=args.window).core
    ids = corpus_tokens(engines["auto"].tokenizer, args.tokens)
    windows = [ids[w : w + args.window] for w in range(0, len(ids) - args.window + 1, args.window)]
    targets = torch.tensor(windows, device=engines["auto"].device)[:, 1:]  # [windows, window - 1]
    nll = {name: 0.0 for name in dtypes}
    kl = {name: 0.0 for name in dtypes}
    agree = {name: 0 for name in dtypes}
    start_time = time.perf_counter()
    streams = [steps_logprobs(engines[name], windows, chunk) for name in dtypes]
    for step, logps in enumerate(zip(*streams)):
        lo = step * chunk
        hi = min(lo + chunk, args.window - 1)  # the window's last position has no target
        if hi <= lo:
            continue
        tgt = targets[:, lo:hi, None]
        ref = logps[0][:, : hi - lo]
        for name, logp in zip(dtypes, logps):
            logp = logp[:, : hi - lo]
            nll[name] += -logp.gather(2, tgt).sum().item()
            kl[name] += F.kl_div(logp, ref, log_target=True, reduction="sum").item()  # KL(ref || quant)
            agree[name] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
        if step % max(1, 256 // chunk) == 0:
            print(f"position {hi}/{args.window} ({time.perf_counter() - start_time:.0f} s)", flush=True)
    scored = len(windows) * (args.window - 1)

    base_ppl = math.exp(nll["auto"] / scored)
    quality = {}
    print(f"\n{scored} tokens of pydoc_data.topics, {len(windows)} windows of {args.window}, "
          f"{args.mode} mode, {engines['auto'].dtype} on {engines['auto'].device}\n")
    print(f"{'dtype':9} {'ppl':>8} {'vs auto':>8} {'goal':>7} {'KL (nats)':>10} {'top-1 agree':>12}")
    for name in dtypes:
        ppl = math.exp(nll[name] / scored)
        delta = 100 * (ppl / base_ppl - 1)
        goal = GOALS.get(name)
        quality[name] = {"perplexity": ppl, "perplexity_increase_pct": delta, "goal_pct": goal,
                         "meets_goal": None if goal is None else delta <= goal,
                         "mean_kl_nats": kl[name] / scored, "top1_agreement": agree[name] / scored}
        print(f"{name:9} {ppl:8.4f} {delta:+7.2f}% {'' if goal is None else f'+{goal}%':>7} "
              f"{kl[name] / scored:10.2e} {agree[name] / scored:12.4f}")

    capacity = capacity_table()
    print(f"\n{'tokens per GiB':22}" + "".join(f"{n:>11}" for n in KV_CACHE_DTYPES))
    for model, rows in capacity.items():
        print(f"{model:22}" + "".join(f"{rows[n]['tokens_per_gib']:>11}" for n in KV_CACHE_DTYPES))
        print(f"{'  x bf16':22}" + "".join(f"{rows[n]['x_bf16']:>10.2f}x" for n in KV_CACHE_DTYPES))
        print(f"{'  x bf16, 4k sequences':22}" + "".join(
            f"{rows[n]['x_bf16_in_4k_sequences']:>10.2f}x" for n in KV_CACHE_DTYPES))

    RESULTS.mkdir(exist_ok=True)
    device = engines["auto"].device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = RESULTS / f"kv_quality_{args.mode}_{device_name.replace(' ', '_')}.json"
    out.write_text(json.dumps({
        "model": engines["auto"].model_name, "device": device_name, "host": platform.machine(),
        "model_dtype": str(engines["auto"].dtype), "text": "pydoc_data.topics (sorted keys, joined)",
        "tokens_scored": scored, "windows": len(windows), "window": args.window, "mode": args.mode,
        "chunk": chunk, "seconds": time.perf_counter() - start_time,
        "quality": quality, "capacity": capacity, "capacity_goals_x_bf16": CAPACITY_GOALS,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
