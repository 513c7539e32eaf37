"""Decode attention and KV write on quantized KV caches, against bf16 measured in the same run.

(a) decode attention, Llama-3.1-8B shapes (32 q heads, 8 kv heads, head_dim 128, bf16 q),
    batch 32 x 8k context (sequence i holds 8192 - (37 i mod 64) tokens, so an int4
    sequence's ring holds 0..63 of them, an int2 one's 64..127), each dtype at its default block size (16; 64
    for int4/int2), blocks scattered: time, bytes read (codes, scales/zeros, residual,
    block tables), effective bandwidth against the device-to-device copy, speedup vs bf16.
    Decode is memory-bound, so the speedup should approach bf16's bytes / the dtype's bytes;
    what is left of the gap is the per-tile unpack (ALU) and the codes' trip through shared
    memory to the tensor-core layout (kernels/triton_paged_tile.py).
(b) KV write of a 4096-token prefill (one sequence, int4/int2: 64 whole blocks flushed):
    time and bytes read + written per dtype.
fp8 and int8 decode is timed in both readings of the codes (bytes, and int16 pairs:
triton_attention_decode.DECODE_CODE_PAIRS): the default's row, then the other's ("+pairs" or
"+bytes"), so one run decides the switch.
Every kernel is first checked against its reference on the GPU: attention's relative error
on 4 of the sequences, the write's codes (>= 99.9% equal, all within 1).
Timing: kernel_bench.per_call_ms, a CUDA graph of calls back to back over rotating buffers
(several times the L2 in all, as a model's layers are), median per call.

Usage: python benchmarks/kv_quant_kernel_bench.py [--dtypes auto,int4] [--tile-tokens N]
  [--num-warps N] [--num-stages N] [--num-splits N] [--lanes N] [--codes-f16 0|1] [--max-registers N]
  [--fp8-screen-adds] [--sweep]
The tunables apply to the quantized dtypes (bf16 keeps the kernel's defaults, the peer);
--sweep also times a grid of them per dtype (tile x warps x stages at the default splits and
lanes, then the best with fewer and more splits, fp8/int8 with the other codes_f16 and the
other reading of the codes at each depth, with and without a register cap (and with twice
the splits under it), and, quantized,
with 1, 2 and 4 lanes). Writes
benchmarks/results/kv_quant_kernels_<gpu>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
import triton
from kernel_bench import (
    DEV,
    DTYPE,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    REL_ERR_BOUND,
    copies_for,
    copy_bandwidth,
    per_call_ms,
    rel_err,
    warm_up_gpu,
)

from wattserve.engine.kivi_plan import kivi_plan, ring_start
from wattserve.kernels.attention import AttentionMetadata, KiviPlan, paged_attention_ref
from wattserve.kernels.kv_format import (
    KV_CACHE_DTYPES,
    allocate_layer,
    default_block_size,
    kv_format,
)
from wattserve.kernels.kv_quant import unpack
from wattserve.kernels.kv_write import write_kv_ref
from wattserve.kernels.triton_attention_decode import (
    default_num_splits,
    paged_decode_attention_cache,
)
from wattserve.kernels import triton_attention_decode, triton_kv_write
from wattserve.kernels.triton_kv_write import write_kv_triton

BATCH, CONTEXT, PREFILL = 32, 8192, 4096
CHECK_SEQS = 4  # sequences the float32 reference attends over (it materializes K and V)


# ---- caches ------------------------------------------------------------------------------------
def random_cache(name: str, context_lens: list[int], gen: torch.Generator):
    """(cache, block_tables, KIVI plan or None): random codes and plausible scales (the kernels'
    speed does not depend on the values), each sequence's blocks scattered over the pool,
    sequence i in ring i."""
    fmt, bs = kv_format(name), default_block_size(name)
    blocks = [-(-c // bs) for c in context_lens]
    num_blocks = sum(blocks) + 1
    cache = allocate_layer(fmt, num_blocks, bs, KV_HEADS, HEAD_DIM, DTYPE, torch.device(DEV), len(context_lens))
    for t in (cache.k, cache.v):
        if not fmt.quantized:
            t.normal_(generator=gen)
        elif fmt.fp8:
            t.copy_(torch.randn(t.shape, device=DEV, generator=gen).to(t.dtype))
        else:
            t.copy_(torch.randint(0, 256, t.shape, device=DEV, generator=gen, dtype=torch.uint8))
    qmax = (1 << fmt.bits) - 1
    for scale, zero in ((cache.k_scale, cache.k_zero), (cache.v_scale, cache.v_zero)):
        if scale is not None:
            scale.copy_(torch.rand(scale.shape, device=DEV, generator=gen) * 2 / max(qmax, 1) + 1e-3)
        if zero is not None and zero.dtype == torch.uint8:
            zero.copy_(torch.randint(0, qmax + 1, zero.shape, device=DEV, generator=gen, dtype=torch.uint8))
        elif zero is not None:  # a KIVI key minimum
            zero.copy_(-torch.rand(zero.shape, device=DEV, generator=gen))
    for t in (cache.k_ring, cache.v_ring):
        if t is not None:
            t.normal_(generator=gen)
    if fmt.sink:
        cache.sink.copy_(torch.randint(0, 256, cache.sink.shape, device=DEV, generator=gen, dtype=torch.uint8))
        cache.sink_scale.fill_(1 / 64)
        cache.sink_zero.fill_(128)
    perm = torch.randperm(num_blocks - 1, device=DEV, generator=gen) + 1
    tables = torch.zeros(len(context_lens), max(blocks), dtype=torch.int32, device=DEV)
    start = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = perm[start : start + nb]
        start += nb
    return cache, tables, decode_plan(fmt, tables, context_lens)


def decode_plan(fmt, tables: torch.Tensor, context_lens: list[int]) -> KiviPlan | None:
    """A decode-only step's KIVI plan over full contexts (nothing written): slot i, no prefix hit."""
    if not fmt.kivi:
        return None
    n = len(context_lens)
    return kivi_plan(context_lens, [0] * n, tables.tolist(), [(i, 0) for i in range(n)],
                     default_block_size(fmt.name), fmt.ring_blocks, torch.device(DEV))


def decode_bytes(name: str, context_lens: list[int]) -> dict:
    """Bytes one decode call reads from memory, by kind."""
    fmt, bs = kv_format(name), default_block_size(name)
    d, h = HEAD_DIM, KV_HEADS
    tokens = sum(context_lens)
    tables = sum(-(-c // bs) for c in context_lens) * 4
    if not fmt.quantized:
        return {"codes": 2 * tokens * h * d * DTYPE.itemsize, "meta": 0, "residual": 0, "tables": tables}
    if fmt.kivi:
        coded = sum(ring_start(0, c, bs, fmt.ring_blocks) for c in context_lens)
        sinks = sum(ring_start(0, c, bs, fmt.ring_blocks) > 0 for c in context_lens) if fmt.sink else 0
        return {"codes": 2 * coded * h * fmt.codes_dim(d),
                # V scale + zero; K scale + min per block; int8 K and V + scale + zero per sink
                "meta": coded * h * 3 + coded // bs * h * d * 2 * 2 + sinks * 2 * h * (d + 3),
                "residual": 2 * (tokens - coded) * h * d * DTYPE.itemsize, "tables": tables}
    per_token = 2 + 2 if fmt.fp8 else 3 + 3
    return {"codes": 2 * tokens * h * fmt.codes_dim(d), "meta": tokens * h * per_token, "residual": 0,
            "tables": tables}


def decode_meta(fmt, tables, lens: torch.Tensor) -> AttentionMetadata:
    n = tables.shape[0]
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=DEV), block_tables=tables, context_lens=lens,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=DEV), query_lens=[1] * n,
        context_lens_host=lens.tolist(), kivi=decode_plan(fmt, tables, lens.tolist()),
    )


# ---- (a) decode ----------------------------------------------------------------------------------
def decode_case(name: str, gen, tunables: dict, sweep: bool) -> dict:
    lens = [CONTEXT - (37 * i) % 64 for i in range(BATCH)]
    nbytes = decode_bytes(name, lens)
    total = sum(nbytes.values())
    layers = [random_cache(name, lens, gen) for _ in range(copies_for(total))]
    q = torch.randn(BATCH, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = HEAD_DIM**-0.5
    cache, tables, _ = layers[0]
    c = CHECK_SEQS
    check = decode_meta(cache.fmt, tables[:c], context_lens[:c])
    ref = paged_attention_ref(q[:c].float(), cache, check, scale)
    fmt = cache.fmt
    # 8-bit codes: the reading DECODE_CODE_PAIRS leaves aside, timed beside the default
    other = {"code_pairs": not triton_attention_decode.DECODE_CODE_PAIRS} if fmt.quantized and fmt.bits == 8 else {}

    def checked(**kw):
        out = paged_decode_attention_cache(q[:c], cache, tables[:c], context_lens[:c], scale, check.kivi, **kw)
        err = rel_err(out, ref)
        if err > REL_ERR_BOUND:
            raise SystemExit(f"decode {name} {kw}: relative error {err:.2e} over {REL_ERR_BOUND:.0e}; "
                             "not timing a wrong kernel")
        return err

    err = checked(**tunables)
    other_err = checked(**tunables, **other) if other else None
    del ref

    def run(**kw):
        t = per_call_ms([
            lambda cache=cache, tb=tb, sl=sl: paged_decode_attention_cache(q, cache, tb, context_lens, scale, sl, **kw)
            for cache, tb, sl in layers
        ])
        return {"ms": t, "bytes_per_s": total / (t * 1e-3), **kw}

    result = {"dtype": name, "block_size": default_block_size(name), "batch": BATCH, "contexts": [min(lens), max(lens)],
              "rel_err": err, "bytes": nbytes, "bytes_total": total, "layers": len(layers),
              "default": run(**tunables), "default_again": run(**tunables)}
    if other:
        result["other_reading"] = {**run(**tunables, **other), "rel_err": other_err}
    if sweep:
        result["sweep"] = sweep_decode(name, run, tables.shape[1])
    return result


# Triton 3.6 pipelines the codes behind their block-table entries: (stages - 1) // 2 tiles of
# codes in flight, so 2 and 4 compile as 3 and 5 do (seen in the TTGIR, sm_90).
SWEEP_STAGES = (3, 5, 7)
SWEEP_MAX_REGISTERS = 168


def sweep_decode(name: str, run, table_width: int) -> list[dict]:
    kivi, bs = kv_format(name).kivi, default_block_size(name)
    tiles = [t for t in (16, 32, 64, 128) if not kivi or t <= bs]
    configs = [run(tile_tokens=t, num_warps=w, num_stages=s)
               for t, w, s in itertools.product(tiles, (4, 8), SWEEP_STAGES)]
    best = min(configs, key=lambda r: r["ms"])
    tile = best["tile_tokens"]
    fmt = kv_format(name)
    splits = default_num_splits(BATCH, KV_HEADS, triton.cdiv(table_width * bs, tile), torch.device(DEV),
                                fmt.quantized)
    for factor in (0.5, 2, 4):
        configs.append(run(tile_tokens=tile, num_warps=best["num_warps"], num_stages=best["num_stages"],
                           num_splits=max(1, int(splits * factor))))
    if fmt.quantized and fmt.bits == 8:  # codes into the dots as bf16 instead of fp16 (code_dtype)
        configs.append(run(tile_tokens=tile, num_warps=best["num_warps"], num_stages=best["num_stages"],
                           codes_f16=not best.get("codes_f16", True)))
        # The other reading of the codes (DECODE_CODE_PAIRS) at each depth, and capped at 168
        # registers: 3 programs of 4 warps per SM (65536 / (128 x 168)) where shared memory allows,
        # which only the programs of twice the splits fill (batch 32 x 8 kv heads: 256 programs).
        pairs = not triton_attention_decode.DECODE_CODE_PAIRS
        for stages in SWEEP_STAGES:
            for cap in ({}, {"max_registers": SWEEP_MAX_REGISTERS},
                        {"max_registers": SWEEP_MAX_REGISTERS, "num_splits": 2 * splits}):
                configs.append(run(tile_tokens=tile, num_warps=best["num_warps"], num_stages=stages,
                                   code_pairs=pairs, **cap))
    for lanes in (1, 2, 4) if fmt.quantized else ():  # KV_HEADS into HEADS: groups of 4, up to 4 lanes
        try:
            configs.append(run(tile_tokens=tile, num_warps=best["num_warps"], num_stages=best["num_stages"],
                               lanes=lanes))
        except triton.runtime.errors.OutOfResources as e:  # lanes x a tile's stages of codes
            configs.append({"ms": float("inf"), "error": str(e), "tile_tokens": tile, "lanes": lanes})
    return sorted(configs, key=lambda r: r["ms"])


# ---- (b) KV write of a prefill ---------------------------------------------------------------
def prefill_write_meta(name: str, num_tokens: int) -> tuple[AttentionMetadata, int]:
    """One sequence's prompt into blocks 0.. in order (the write's speed does not depend on
    which), ring 0; and the number of blocks."""
    fmt, bs = kv_format(name), default_block_size(name)
    nb = -(-num_tokens // bs)
    meta = AttentionMetadata(torch.arange(num_tokens, device=DEV), None, None, None, [num_tokens], [num_tokens])
    if fmt.kivi:
        meta.kivi = kivi_plan([0], [num_tokens], [list(range(nb))], [(0, 0)], bs, fmt.ring_blocks,
                              torch.device(DEV))
    return meta, nb


def write_bytes(name: str, num_tokens: int) -> int:
    """k and v read, codes and metadata written (residual rows for a partial last block)."""
    fmt, bs = kv_format(name), default_block_size(name)
    d, h = HEAD_DIM, KV_HEADS
    read = 2 * num_tokens * h * d * DTYPE.itemsize
    if not fmt.quantized:
        return 2 * read
    full = num_tokens // bs * bs if fmt.kivi else num_tokens
    written = 2 * full * h * fmt.codes_dim(d)
    if fmt.fp8:
        written += 2 * full * h * 2
    elif fmt.kivi:
        ring = num_tokens - ring_start(0, num_tokens, bs, fmt.ring_blocks)
        written += full * h * 3 + full // bs * h * d * 4 + 2 * ring * h * d * DTYPE.itemsize
        if fmt.sink:
            written += full // bs * 2 * h * (d + 3)
    else:
        written += 2 * full * h * 3
    return read + written


def write_case(name: str, gen) -> dict:
    fmt = kv_format(name)
    meta, nb = prefill_write_meta(name, PREFILL)

    def inputs():
        # k and v as strided views of one fused projection, as the model passes them.
        qkv = torch.randn(PREFILL, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV, generator=gen)
        cache = allocate_layer(fmt, nb, default_block_size(name), KV_HEADS, HEAD_DIM, DTYPE, torch.device(DEV), 1)
        return qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :], cache

    k, v, got = inputs()
    want = dataclasses.replace(got, **{f.name: getattr(got, f.name).clone() for f in dataclasses.fields(got)
                                       if isinstance(getattr(got, f.name), torch.Tensor)})
    write_kv_triton(k, v, got, meta)
    write_kv_ref(k, v, want, meta)
    if fmt.quantized and not fmt.fp8:
        a, b = unpack(got.k, fmt.bits), unpack(want.k, fmt.bits)
        equal = (a == b).float().mean().item()
        ok = equal >= 0.999 and (a - b).abs().max().item() <= 1
    else:
        equal = (got.k.view(torch.uint8) == want.k.view(torch.uint8)).float().mean().item()
        ok = equal == 1.0
    if not ok:
        raise SystemExit(f"write {name}: only {equal:.4%} of K codes match the reference")
    nbytes = write_bytes(name, PREFILL)
    sets = [inputs() for _ in range(copies_for(nbytes))]
    t = per_call_ms([lambda s=s: write_kv_triton(*s, meta) for s in sets])
    return {"dtype": name, "tokens": PREFILL, "codes_equal": equal, "bytes": nbytes, "ms": t,
            "bytes_per_s": nbytes / (t * 1e-3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default=",".join(KV_CACHE_DTYPES), help="comma-separated; auto (bf16) is always run")
    ap.add_argument("--tile-tokens", type=int)
    ap.add_argument("--num-warps", type=int)
    ap.add_argument("--num-stages", type=int)
    ap.add_argument("--num-splits", type=int)
    ap.add_argument("--lanes", type=int)
    ap.add_argument("--codes-f16", type=int, choices=(0, 1), help="fp8/int8: codes into the dots as fp16 (1, the "
                                                                  "default) or bf16 (0)")
    ap.add_argument("--max-registers", type=int, help="cap the decode kernel's registers per thread (maxnreg): "
                                                      "more programs per SM where shared memory allows")
    ap.add_argument("--fp8-screen-adds", action="store_true",
                    help="the fp8 write's scale screening rounds by float adds (triton_kv_write.FP8_SCREEN_BY_ADDS)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of decode tunables per dtype")
    args = ap.parse_args()
    names = ["auto"] + [n for n in args.dtypes.split(",") if n != "auto"]
    for n in names:
        kv_format(n)  # rejects unknown names before any work
    tunables = {k: v for k, v in (("tile_tokens", args.tile_tokens), ("num_warps", args.num_warps),
                                  ("num_stages", args.num_stages), ("num_splits", args.num_splits),
                                  ("lanes", args.lanes), ("codes_f16", args.codes_f16),
                                  ("max_registers", args.max_registers)) if v is not None}
    triton_kv_write.FP8_SCREEN_BY_ADDS = args.fp8_screen_adds  # read by each write's launch
    gen = torch.Generator(device=DEV).manual_seed(0)
    device = torch.cuda.get_device_name()

    warm_up_gpu()
    copy = copy_bandwidth()
    results = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
               "copy_bytes_per_s": copy, "tunables": tunables, "fp8_screen_by_adds": args.fp8_screen_adds,
               "decode_code_pairs": triton_attention_decode.DECODE_CODE_PAIRS,
               "decode": [], "write": []}
    for n in names:
        results["decode"].append(decode_case(n, gen, {} if n == "auto" else tunables, args.sweep))
        results["write"].append(write_case(n, gen))
        torch.cuda.empty_cache()

    base = results["decode"][0]["default"]["ms"]
    base_w = results["write"][0]["ms"]
    print(f"\n{device}: copy {copy / 1e12:.2f} TB/s (read + write); decode batch {BATCH} x {CONTEXT}, "
          f"write {PREFILL} tokens")
    print(f"{'dtype':9} {'block':>5} {'ms':>8} {'again':>8} {'MB read':>8} {'TB/s':>6} {'vs copy':>7} "
          f"{'speedup':>7} {'bytes':>6} | {'write ms':>8} {'GB/s':>6} {'vs bf16':>7}")
    for d, w in zip(results["decode"], results["write"]):
        r = d["default"]
        byte_ratio = results["decode"][0]["bytes_total"] / d["bytes_total"]
        print(f"{d['dtype']:9} {d['block_size']:5d} {r['ms']:8.4f} {d['default_again']['ms']:8.4f} "
              f"{d['bytes_total'] / 1e6:8.1f} {r['bytes_per_s'] / 1e12:6.2f} {r['bytes_per_s'] / copy:7.0%} "
              f"{base / r['ms']:6.2f}x {byte_ratio:5.2f}x | {w['ms']:8.4f} {w['bytes_per_s'] / 1e9:6.0f} "
              f"{w['ms'] / base_w:6.2f}x")
        if "other_reading" in d:
            o = d["other_reading"]
            label = d["dtype"] + ("+pairs" if o["code_pairs"] else "+bytes")
            print(f"{label:15} {o['ms']:8.4f} {'':>8} {d['bytes_total'] / 1e6:8.1f} {o['bytes_per_s'] / 1e12:6.2f} "
                  f"{o['bytes_per_s'] / copy:7.0%} {base / o['ms']:6.2f}x {byte_ratio:5.2f}x |")
    print("speedup: bf16's decode time / the dtype's; bytes: bf16's bytes read / the dtype's (the memory-bound "
          "limit); write vs bf16: time ratio")
    if args.sweep:
        for d in results["decode"]:
            print(f"{d['dtype']} best:", [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()
                                           if k != "bytes_per_s"} for c in d["sweep"][:3]])

    path = Path(__file__).parent / "results" / f"kv_quant_kernels_{device.replace(' ', '_')}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
