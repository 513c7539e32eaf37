"""Triton paged attention for prefill and chunked prefill, varlen across the batch.

Reference: attention.paged_attention_ref (same arguments). Correct for any mix of query
lengths, decodes (query_len 1) included.

Flash-attention tiling: a program takes BLOCK_M query rows and walks the sequence's keys
BLOCK_N at a time through the block table with an online softmax, float32 accumulators.
GQA: the rows of a tile are BLOCK_Q consecutive tokens x the GROUP query heads of one kv head
(row r is token r // GROUP, head r % GROUP), so each K/V tile is read once for the whole group
and short queries (decodes, small chunks) still fill the tile's rows.

The grid is (query tiles across the flat batch, kv heads). Sequence i owns tile indices
query_start_loc[i] // BLOCK_Q + i onward (at least as many as its query needs); a program
finds its sequence by binary search over query_start_loc, so the grid comes from host shapes
alone and nothing is read back from the device.

A quantized cache is read as codes and dequantized per tile in registers
(triton_paged_tile.py); with int4/int2 (KIVI) keys, positions from a sequence's ring
start on come from its full-precision ring, and int2's position 0 from its int8
sink copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import FORMATS, LayerKVCache
from wattserve.kernels.triton_paged_tile import (
    LOG2E,
    attend_sink,
    attend_tile,
    attend_tile_quantized,
    cache_kernel_args,
    code_dtype,
    codes_query,
    in_window,
    join_units,
    kv_codes,
    split_planes,
    tile_blocks,
    tile_scales,
    variant_args,
)


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence i with query_start_loc[i] // BLOCK_Q + i <= tile."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_coded_tile(
    accs, m, l, u, q, qs, q_sum, q_pos, start, kv_end, table, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head, stride_m_block, stride_m_tok,
    stride_kc_block, stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_BITS: tl.constexpr, FP8: tl.constexpr, KIVI: tl.constexpr,
    CODE_MAGIC: tl.constexpr, CODE_BIAS: tl.constexpr, UNPACK_ASM: tl.constexpr, SINK: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, V_UNIT: tl.constexpr,
):
    """One tile of a quantized cache (one lane: every row attends it): its scales, then
    attend_tile_quantized."""
    blocks = (tile_blocks(table, start, kv_end, BLOCK_SIZE, BLOCK_N),)
    scales = tile_scales(
        0, blocks, (start,), kv_end, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head,
        stride_m_block, stride_m_tok, stride_kc_block, HEAD_DIM, BLOCK_SIZE, BLOCK_N, FP8, KIVI,
    )
    return attend_tile_quantized(
        accs, m, l, u, q, qs, q_sum, q_pos, 0, (start,), kv_end, table, k_cache_ptr, v_cache_ptr, scales,
        kv_head, stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, KV_BITS, FP8, KIVI, CODE_MAGIC, CODE_BIAS, UNPACK_ASM,
        SINK, WINDOW, SOFTCAP, V_UNIT,
    )


# num_seqs and stride_table (the widest block table) change from step to step; Triton would
# compile a variant for each of == 1, a multiple of 16 and neither, for scalars that only
# index a binary search and a row of the table: one variant (engine/warmup.py compiles it).
@triton.jit(do_not_specialize=["num_seqs", "stride_table"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, k_res_ptr, v_res_ptr, res_tables_ptr, res_starts_ptr,
    sink_ptr, sink_scale_ptr, sink_zero_ptr,
    stride_m_block, stride_m_tok, stride_kc_block, stride_r_slot, stride_r_tok, stride_r_head, stride_res_table,
    num_kv_heads, scale_log2, num_seqs, window, softcap,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_table,
    stride_c_block, stride_c_tok, stride_c_head,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_BITS: tl.constexpr, FP8: tl.constexpr, KIVI: tl.constexpr, CODE_MAGIC: tl.constexpr,
    CODE_BIAS: tl.constexpr, PLANES: tl.constexpr, UNPACK_ASM: tl.constexpr, SINK: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, CODES_F16: tl.constexpr, V_UNIT: tl.constexpr,
):
    # Highest tile first: a sequence's last query tiles see the most keys, so the longest
    # programs start early instead of forming the tail.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    first_pos = ctx - q_len + q_tile * BLOCK_Q  # position of the tile's first query token

    r = tl.arange(0, BLOCK_M)
    q_local = q_tile * BLOCK_Q + r // GROUP
    row_valid = (r // GROUP < BLOCK_Q) & (q_local < q_len)
    head = kv_head * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    q_tok = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                mask=row_valid[:, None], other=0.0)
    q_pos = first_pos + r // GROUP
    table = block_tables_ptr + seq.to(tl.int64) * stride_table

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the tile's first query are visible to every row: no causal mask there.
    # Every row sees at least key first_pos, so no row's sum stays 0.
    kv_end = tl.minimum(first_pos + BLOCK_Q, ctx)
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    # With a window, tiles wholly before the first row's window are skipped; the rest are
    # masked (attend_tile masks whenever WINDOW is set).
    lo = 0
    if WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    if KV_BITS == 0:
        q = q.to(k_cache_ptr.dtype.element_ty)
        for start in range(lo, unmasked_end, BLOCK_N):
            acc, m, l = attend_tile(
                acc, m, l, q, q_pos, start, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head,
                stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, WINDOW, SOFTCAP,
            )
        for start in range(unmasked_end, kv_end, BLOCK_N):
            acc, m, l = attend_tile(
                acc, m, l, q, q_pos, start, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head,
                stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, WINDOW, SOFTCAP,
            )
    else:
        qs, q_sum = codes_query(q, PLANES, CODES_F16)
        coded_end = kv_end
        if KIVI:  # positions from the ring start on are in the ring
            res_start = tl.load(res_starts_ptr + seq)
            coded_end = tl.minimum(kv_end, res_start)
        accs = split_planes(acc, PLANES)
        u = tl.full([BLOCK_M], 1.0, tl.float32)
        # Tiles wholly below every row's position need no causal mask; the rest do.
        for start in range(lo, tl.minimum(unmasked_end, coded_end), BLOCK_N):
            accs, m, l, u = _attend_coded_tile(
                accs, m, l, u, q, qs, q_sum, q_pos, start, kv_end, table, k_cache_ptr, v_cache_ptr,
                k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head, stride_m_block, stride_m_tok,
                stride_kc_block, stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, KV_BITS, FP8, KIVI, CODE_MAGIC, CODE_BIAS,
                UNPACK_ASM, SINK, WINDOW, SOFTCAP, V_UNIT,
            )
        for start in range(unmasked_end, coded_end, BLOCK_N):
            accs, m, l, u = _attend_coded_tile(
                accs, m, l, u, q, qs, q_sum, q_pos, start, kv_end, table, k_cache_ptr, v_cache_ptr,
                k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head, stride_m_block, stride_m_tok,
                stride_kc_block, stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, KV_BITS, FP8, KIVI, CODE_MAGIC, CODE_BIAS,
                UNPACK_ASM, SINK, WINDOW, SOFTCAP, V_UNIT,
            )
        acc = join_units(accs, u, V_UNIT)
        if SINK:  # position 0, from its int8 copy
            if coded_end > 0:
                rows = in_window(r >= 0, q_pos, window, WINDOW)
                acc, m, l = attend_sink(acc, m, l, q, rows, table, sink_ptr, sink_scale_ptr, sink_zero_ptr,
                                        kv_head, num_kv_heads, scale_log2, softcap, HEAD_DIM, SOFTCAP)
        if KIVI:
            # The ring rows as a block table of positions from the ring start on.
            res_table = res_tables_ptr + seq * stride_res_table
            for start in range(tl.maximum(lo, tl.minimum(unmasked_end, coded_end)), unmasked_end, BLOCK_N):
                acc, m, l = attend_tile(
                    acc, m, l, q, q_pos - res_start, start - res_start, kv_end - res_start, res_table,
                    k_res_ptr, v_res_ptr, kv_head, stride_r_slot, stride_r_tok, stride_r_head, scale_log2,
                    window, softcap, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, WINDOW, SOFTCAP,
                )
            for start in range(tl.maximum(unmasked_end, coded_end), kv_end, BLOCK_N):
                acc, m, l = attend_tile(
                    acc, m, l, q, q_pos - res_start, start - res_start, kv_end - res_start, res_table,
                    k_res_ptr, v_res_ptr,
                    kv_head, stride_r_slot, stride_r_tok, stride_r_head, scale_log2, window, softcap,
                    HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, WINDOW, SOFTCAP,
                )

    o = acc / l[:, None]
    tl.store(out_ptr + q_tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, **tunables,
) -> torch.Tensor:
    """`paged_prefill_attention_cache` on a cache in the model dtype given as its two tensors
    [num_blocks, block_size, num_kv_heads, head_dim]."""
    return paged_prefill_attention_cache(q, LayerKVCache(FORMATS["auto"], k_cache, v_cache), meta, scale, **tunables)


def paged_prefill_attention_cache(
    q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
    scale: float, sliding_window: int | None = None, softcap: float | None = None,
    *, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int = 3, codes_f16: bool = False,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; cache: one layer, any --kv-cache-dtype
    (kernels/kv_format.py); sliding_window, softcap: as attention.paged_attention_ref.
    Returns [num_tokens, num_heads, head_dim]. Reads
    meta.query_start_loc, context_lens, block_tables (and meta.kivi's ring tables) on the
    device; meta.max_query_len (host) only picks the tile shape.

    Defaults measured on an H100 (benchmarks/kernel_bench.py --sweep, 4096-token prompt,
    head_dim 128, bf16): 128 x 128 tiles, 8 warps, 3 stages, 20% faster than 128 x 64.
    block_m: query rows (tokens x group heads) per program; 128, or fewer when the longest
    query needs fewer rows. block_n: keys per step, a power of two; 128 where
    three stages of K and V fit in shared memory (rows of at most 256 bytes), else 64; with
    per-channel keys (int4/int2) at most block_size. num_warps: 8 for 128-row tiles, else 4.
    codes_f16: as paged_decode_attention_cache's; off here, since with it the fp8 tile of 128
    rows spilled registers (sm_90 SASS, Triton 3.6) where it did not before (benchmarks/
    kv_prefill_bench.py --sweep times both).
    """
    num_tokens, num_heads, head_dim = q.shape
    k_cache, v_cache = kv_codes(cache)
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert num_heads == group * num_kv_heads and head_dim == triton.next_power_of_2(head_dim) >= 16
    dot_dtype = code_dtype(cache.fmt, q.dtype, codes_f16) if cache.fmt.quantized else k_cache.dtype
    if block_n is None:
        block_n = 128 if head_dim * dot_dtype.itemsize <= 256 else 64
    if cache.fmt.kivi:  # a tile must lie in one block: one key range per channel
        block_n = min(block_n, block_size)
        assert block_size % block_n == 0
    assert k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    out = torch.empty_like(q)
    num_seqs = meta.block_tables.shape[0]
    if num_tokens == 0:
        return out
    if block_m is None:
        block_m = min(128, max(16, triton.next_power_of_2(meta.max_query_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    fmt_args, fmt_constexprs = cache_kernel_args(cache, q.dtype, meta.kivi, codes_f16)
    _prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, meta.block_tables, meta.context_lens, meta.query_start_loc, *fmt_args,
        scale * LOG2E, num_seqs, *variant_args(sliding_window, softcap),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
        WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", **fmt_constexprs,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
