"""End to end, per KV cache dtype: the largest batch of 4k-token sequences that fits in the same
KV memory, and the output tokens/s it decodes at. Llama-3.1-8B shapes, random weights, bf16.

Every dtype gets the same --kv-memory (ring of int4/int2 included), so the batch
grows with the tokens each format holds per GiB. The batch is the KV capacity divided by the
sequence length (prompt + output): no preemption, checked. Output tokens/s is measured over
the decode phase (after every sequence has its first token) and over the whole run.

Usage (CUDA): python benchmarks/kv_capacity_bench.py --tokenizer DIR [--kv-memory-gib 8]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from llama8b_config import (  # benchmarks/ is the script's directory
    LLAMA31_8B,
    write_checkpoint_dir,
)

from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.kernels.kv_format import (
    KV_CACHE_DTYPES,
    bytes_per_block,
    bytes_per_ring,
    default_block_size,
    kv_format,
)

RESULTS = Path(__file__).parent / "results"


def largest_batch(dtype: str, args) -> int:
    """Sequences of prompt + output tokens that the KV budget holds: each takes its blocks and,
    for int4/int2, one ring (the engine sizes the slots by the batch bound)."""
    fmt, bs = kv_format(dtype), default_block_size(dtype)
    layers, heads, dim = LLAMA31_8B["num_hidden_layers"], LLAMA31_8B["num_key_value_heads"], LLAMA31_8B["head_dim"]
    blocks = -(-(args.prompt_len + args.output_len) // bs)
    per_seq = layers * (blocks * bytes_per_block(fmt, bs, heads, dim, torch.bfloat16)
                        + bytes_per_ring(fmt, bs, heads, dim, torch.bfloat16))
    return int(args.kv_memory_gib * 2**30) // per_seq


def make_llm(dtype: str, workdir: Path, args, max_num_seqs: int) -> LLM:
    return LLM(str(workdir), load_format="dummy", dtype="bfloat16", tokenizer=args.tokenizer,
               kv_cache_dtype=dtype, kv_cache_memory=int(args.kv_memory_gib * 2**30),
               block_size=default_block_size(dtype), max_num_seqs=max_num_seqs, max_num_batched_tokens=16384,
               max_model_len=args.prompt_len + args.output_len)


def run_batch(llm: LLM, batch: int, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = [torch.randint(0, 128000, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]
    started = set()
    produced = 0
    all_started = produced_at_start = None

    def watch(outputs) -> None:  # the decode phase starts when every sequence has its first token
        nonlocal produced, all_started, produced_at_start
        produced += sum(len(s.token_ids) for out in outputs for s in out.outputs)
        started.update(out.request_id for out in outputs)
        if all_started is None and len(started) == batch:
            torch.cuda.synchronize()
            all_started, produced_at_start = time.perf_counter(), produced

    begin = time.perf_counter()
    llm.generate(prompts, params, on_step=watch)
    end = time.perf_counter()
    assert produced == batch * args.output_len
    return {
        "batch": batch, "preemptions": llm.core.scheduler.num_preemptions,
        "prefill_s": all_started - begin, "decode_s": end - all_started,
        "decode_output_tok_s": (produced - produced_at_start) / (end - all_started),
        "output_tok_s": produced / (end - begin),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir for the random-weight model")
    ap.add_argument("--kv-memory-gib", type=float, default=8.0, help="KV cache memory, the same for every dtype")
    ap.add_argument("--prompt-len", type=int, default=4032)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtypes", default=",".join(KV_CACHE_DTYPES))
    args = ap.parse_args()
    workdir = write_checkpoint_dir()
    rows = {}
    for dtype in args.dtypes.split(","):
        batch = largest_batch(dtype, args)
        llm = make_llm(dtype, workdir, args, max_num_seqs=batch)
        rows[dtype] = run_batch(llm, batch, args)
        del llm
        torch.cuda.empty_cache()
        print(dtype, rows[dtype], flush=True)
    base = rows.get("auto")
    print(f"\n{args.kv_memory_gib:g} GiB of KV, sequences of {args.prompt_len} + {args.output_len} tokens")
    print(f"{'dtype':9} {'batch':>6} {'x bf16':>7} {'decode tok/s':>13} {'x bf16':>7} {'run tok/s':>10}")
    for dtype, r in rows.items():
        xb = r["batch"] / base["batch"] if base else float("nan")
        xt = r["decode_output_tok_s"] / base["decode_output_tok_s"] if base else float("nan")
        print(f"{dtype:9} {r['batch']:6d} {xb:6.2f}x {r['decode_output_tok_s']:13.0f} {xt:6.2f}x "
              f"{r['output_tok_s']:10.0f}")
    name = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"kv_capacity_{name.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": name, "model": "Llama-3.1-8B shapes, random weights, bf16",
                               "kv_memory_gib": args.kv_memory_gib, "prompt_len": args.prompt_len,
                               "output_len": args.output_len, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
