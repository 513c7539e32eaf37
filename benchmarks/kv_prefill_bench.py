"""Prefill attention over a quantized KV prefix, alone: one layer, one 8,192-token chunk at the
end of a 130,000-token context (the last chunk of a 130k prompt; Llama-3.1-8B shapes: 32 q
heads, 8 kv heads, head_dim 128, bf16 q), per KV dtype against bf16 in the same run.

Two paths for a quantized cache (kernels/triton_attention.py picks one per step):
  registers: the prefill kernel reads the codes and dequantizes each cached tile once per
             query tile (kernels/triton_paged_tile.py);
  scratch:   the context dequantized once into a bf16 cache (kernels/triton_kv_dequant.py),
             then the bf16 prefill kernel; its dequantizing pass is also timed alone.
Each is first checked against paged_attention_ref on the chunk's last 64 queries (the
reference materializes the scores). Times: triton.testing.do_bench medians (ms; one call
is tens of milliseconds, compute-bound). TFLOP/s counts the causal chunk's QK and PV.

--sweep also times a grid of the prefill kernel's tunables (block_m x block_n x warps x
stages) on bf16 and on each dtype's registers path (fp8/int8: the best again with
codes_f16), so the per-dtype defaults can be chosen on the GPU; --chunk and --context move
the case (a smaller chunk shows where the scratch stops paying:
kernels/triton_kv_dequant.DENSE_MIN_QUERIES_PER_KEY).

Usage: python benchmarks/kv_prefill_bench.py [--dtypes auto,int4] [--sweep] [--chunk N] [--context N]
Writes benchmarks/results/kv_prefill_<gpu>.json.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
from _results import write_results
from kernel_bench import DEV, DTYPE, HEAD_DIM, HEADS, REL_ERR_BOUND, ms, rel_err
from kv_quant_kernel_bench import random_cache

from wattserve.kernels.attention import AttentionMetadata, paged_attention_ref
from wattserve.kernels.kv_format import KV_CACHE_DTYPES, kv_format
from wattserve.kernels.triton_attention_prefill import paged_prefill_attention_cache
from wattserve.kernels.triton_kv_dequant import dequantize_contexts

CHECK_QUERIES = 64
SWEEP = {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}


def chunk_meta(tables: torch.Tensor, chunk: int, context: int, plan) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=DEV), block_tables=tables,
        context_lens=torch.tensor([context], dtype=torch.int32, device=DEV),
        query_start_loc=torch.tensor([0, chunk], dtype=torch.int32, device=DEV),
        query_lens=[chunk], context_lens_host=[context], kivi=plan)


def check(label: str, attend, q, cache, tables, plan, context: int) -> float:
    """Relative error of `attend` (q, cache, meta) against the reference on the last queries."""
    q_last = q[-CHECK_QUERIES:]
    meta = chunk_meta(tables, len(q_last), context, plan)
    err = rel_err(attend(q_last, cache, meta), paged_attention_ref(q_last.float(), cache, meta, HEAD_DIM**-0.5))
    if err > REL_ERR_BOUND:
        raise SystemExit(f"{label}: relative error {err:.2e} over {REL_ERR_BOUND:.0e}; not timing a wrong kernel")
    return err


def registers(q, cache, meta, **tunables):
    return paged_prefill_attention_cache(q, cache, meta, HEAD_DIM**-0.5, **tunables)


def scratch(q, cache, meta):
    dense, dense_meta = dequantize_contexts(cache, meta, q.dtype)
    return paged_prefill_attention_cache(q, dense, dense_meta, HEAD_DIM**-0.5)


def sweep_configs(kivi_block: int | None) -> list[dict]:
    """The tunables grid; KIVI tiles lie in one block (block_n <= its block size)."""
    return [dict(zip(SWEEP, c)) for c in itertools.product(*SWEEP.values())
            if kivi_block is None or c[1] <= kivi_block]


def chunk_flops(chunk: int, context: int) -> float:
    """QK and PV of a causal chunk at the end of `context`: each query sees the prefix and
    the chunk's tokens up to its own."""
    return 4 * HEADS * HEAD_DIM * chunk * (context - chunk + (chunk + 1) / 2)


def dtype_case(name: str, chunk: int, context: int, gen, sweep: bool = False) -> dict:
    """One dtype's paths (and with `sweep` the tunables grid), checked, then timed."""
    fmt = kv_format(name)
    flops = chunk_flops(chunk, context)
    # The plan of a decode after the context is the chunk's: the same ring start and rows.
    cache, tables, plan = random_cache(name, [context], gen)
    q = torch.randn(chunk, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV, generator=gen)
    meta = chunk_meta(tables, chunk, context, plan)

    def timed(fn, **tunables) -> dict:
        try:
            t = ms(lambda: fn(q, cache, meta, **tunables))
        except triton.runtime.errors.OutOfResources as e:  # a tile too large for shared memory
            return {"ms": float("inf"), "error": str(e), **tunables}
        return {"ms": t, "tflops": flops / (t * 1e-3) / 1e12, **tunables}

    result = {"dtype": name, "registers_rel_err": check(f"{name} registers", registers, q, cache, tables, plan, context),
              "registers": timed(registers), "registers_again": timed(registers)}
    if fmt.quantized:
        result["scratch_rel_err"] = check(f"{name} scratch", scratch, q, cache, tables, plan, context)
        result["scratch"] = timed(scratch)
        result["dequantize_ms"] = ms(lambda: dequantize_contexts(cache, meta, q.dtype))
    if sweep:
        configs = [timed(registers, **c) for c in sweep_configs(cache.block_size if fmt.kivi else None)]
        if fmt.quantized and fmt.bits == 8:  # the best again, codes into the dots as fp16 (code_dtype)
            best = {k: v for k, v in min(configs, key=lambda c: c["ms"]).items() if k in SWEEP}
            configs.append(timed(registers, **best, codes_f16=True))
        result["sweep"] = sorted(configs, key=lambda c: c["ms"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default=",".join(KV_CACHE_DTYPES), help="comma-separated; auto (bf16) always runs")
    ap.add_argument("--chunk", type=int, default=8192, help="query tokens")
    ap.add_argument("--context", type=int, default=130000, help="tokens in the cache, the chunk's included")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of the prefill kernel's tunables")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kv_prefill_<gpu>.json)")
    args = ap.parse_args()
    names = ["auto"] + [n for n in args.dtypes.split(",") if n != "auto"]
    for n in names:
        kv_format(n)  # rejects unknown names before any work
    chunk, context = args.chunk, args.context
    device = torch.cuda.get_device_name()
    gen = torch.Generator(device=DEV).manual_seed(0)
    flops = chunk_flops(chunk, context)
    rows = [dtype_case(n, chunk, context, gen, args.sweep) for n in names]
    base = rows[0]["registers"]["ms"]
    print(f"\n{device}: prefill attention, one {chunk}-token chunk at the end of a {context}-token context, one layer")
    print(f"{'dtype':9} {'registers ms':>13} {'x bf16':>7} {'scratch ms':>11} {'x bf16':>7} {'dequant ms':>11} "
          f"{'TFLOP/s':>8}")
    for r in rows:
        reg = r["registers"]["ms"]
        line = f"{r['dtype']:9} {reg:13.3f} {reg / base:6.2f}x"
        best = min(reg, r.get("scratch", {"ms": reg})["ms"])
        if "scratch" in r:
            line += f" {r['scratch']['ms']:11.3f} {r['scratch']['ms'] / base:6.2f}x {r['dequantize_ms']:11.3f}"
        else:
            line += " " * 39
        print(f"{line} {flops / (best * 1e-3) / 1e12:8.1f}")
    if args.sweep:
        for r in rows:
            print(f"{r['dtype']} registers, best 3:", [{k: (round(v, 3) if isinstance(v, float) else v)
                                                       for k, v in c.items() if k != "error"} for c in r["sweep"][:3]])
    write_results({"device": device, "torch": torch.__version__, "triton": triton.__version__, "chunk": chunk,
                   "context": context, "flops": flops, "rows": rows}, "kv_prefill", device, args.out)


if __name__ == "__main__":
    main()
