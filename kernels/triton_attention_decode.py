"""Triton paged decode attention (one query token per sequence), split-K over the context.

Reference: `paged_decode_attention_ref` below (the general `paged_attention_ref` on a
decode-only batch).

Decode reads every cached K and V once and does little arithmetic with it, so the kernel is
written for memory bandwidth:
- GQA: one program serves all query heads of one kv head, so each K/V tile is read once
  (the group is padded to at least 16 rows for the tensor-core dot; the extra rows cost no
  memory traffic).
- Tiles of `tile_tokens` tokens (several cache blocks) gathered through the block table,
  software-pipelined `num_stages` deep, keep enough bytes in flight per SM.
- FlashDecoding: the context is split over `num_splits` programs when sequences x kv heads
  alone would leave SMs idle; a second, small kernel combines their partial
  (max, sum, acc), all float32.
- Quantized caches: the tiles are codes, dequantized in registers (triton_paged_tile.py), so
  the bytes read shrink with the codes; with int4/int2 (KIVI) keys each sequence's positions
  past its last full block come from its full-precision residual slot.
The number of splits comes from host-side shapes only (batch size, block-table width), and
each program reads its sequence's length on the device, so the launch never syncs and can be
captured in a CUDA graph. Each split takes an equal share of its own sequence's tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import AttentionMetadata, paged_attention_ref
from kernels.kv_format import FORMATS, LayerKVCache
from kernels.triton_paged_tile import (
    LOG2E,
    attend_tile,
    attend_tile_quantized,
    cache_kernel_args,
    join_planes,
    kv_codes,
    split_planes,
    tile_blocks,
    tile_scales,
)


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, k_res_ptr, v_res_ptr, res_slots_ptr,
    stride_m_block, stride_m_tok, stride_kc_block, stride_r_slot, stride_r_tok, stride_r_head,
    scale_log2, num_splits,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head, stride_table,
    stride_c_block, stride_c_tok, stride_c_head,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_BITS: tl.constexpr, FP8: tl.constexpr, KIVI: tl.constexpr, CODE_MAGIC: tl.constexpr,
    CODE_BIAS: tl.constexpr, PLANES: tl.constexpr, UNPACK_ASM: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    num_tiles = tl.cdiv(ctx, TILE_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    g = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_seq + head[:, None] * stride_q_head + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    last_pos = tl.zeros([BLOCK_H], tl.int32) + ctx - 1  # the query sits at the context's end
    if KV_BITS == 0:
        q = q.to(k_cache_ptr.dtype.element_ty)
        for t in range(tile_lo, tile_hi):
            acc, m, l = attend_tile(
                acc, m, l, q, last_pos, t * TILE_N, ctx, table, k_cache_ptr, v_cache_ptr, kv_head,
                stride_c_block, stride_c_tok, stride_c_head, scale_log2,
                HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION,
            )
    else:
        q_sum = tl.sum(q.to(tl.float32), axis=1)
        coded_tiles = num_tiles
        coded_end = ctx
        if KIVI:  # positions from the last full block's end on are in the residual
            full = ctx // BLOCK_SIZE * BLOCK_SIZE
            coded_tiles = full // TILE_N
            coded_end = full
        qs = split_planes(q, PLANES)
        accs = split_planes(acc, PLANES)
        # Scales come a tile ahead of their use, their block-table entries two: the pipeliner
        # leaves such narrow gathers synchronous, and a tile would wait for two round trips.
        blocks = tile_blocks(table, tile_lo * TILE_N, coded_end, BLOCK_SIZE, TILE_N)
        scales = tile_scales(
            blocks, tile_lo * TILE_N, coded_end, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head,
            stride_m_block, stride_m_tok, stride_kc_block, HEAD_DIM, BLOCK_SIZE, TILE_N, len(qs), FP8, KIVI,
        )
        blocks = tile_blocks(table, (tile_lo + 1) * TILE_N, coded_end, BLOCK_SIZE, TILE_N)
        for t in range(tile_lo, tl.minimum(tile_hi, coded_tiles)):
            next_scales = tile_scales(
                blocks, (t + 1) * TILE_N, coded_end, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head,
                stride_m_block, stride_m_tok, stride_kc_block, HEAD_DIM, BLOCK_SIZE, TILE_N, len(qs), FP8, KIVI,
            )
            blocks = tile_blocks(table, (t + 2) * TILE_N, coded_end, BLOCK_SIZE, TILE_N)
            accs, m, l = attend_tile_quantized(
                accs, m, l, qs, q_sum, last_pos, t * TILE_N, ctx, table, k_cache_ptr, v_cache_ptr, scales,
                kv_head, stride_c_block, stride_c_tok, stride_c_head, scale_log2,
                HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION, KV_BITS, FP8, KIVI, CODE_MAGIC, CODE_BIAS, UNPACK_ASM,
            )
            scales = next_scales
        acc = join_planes(accs)
        if KIVI:
            # The residual slot as a one-block table; positions relative to the slot's start.
            # At most one tile: unpipelined, its bf16 buffers (32 KB a stage) would set the
            # kernel's shared memory and cap the programs per SM.
            for t in tl.range(tl.maximum(tile_lo, coded_tiles), tile_hi, num_stages=1):
                acc, m, l = attend_tile(
                    acc, m, l, q, last_pos - full, t * TILE_N - full, ctx - full, res_slots_ptr + seq,
                    k_res_ptr, v_res_ptr, kv_head, stride_r_slot, stride_r_tok, stride_r_head, scale_log2,
                    HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION,
                )

    row_mask = (g < GROUP)[:, None]
    if SPLIT:
        # Unnormalized partials; an empty split leaves (-inf, 0, 0), which the combine ignores.
        part = (seq * NUM_HEADS + head) * num_splits + split
        tl.store(part_max_ptr + part, m, mask=g < GROUP)
        tl.store(part_sum_ptr + part, l, mask=g < GROUP)
        tl.store(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc, mask=row_mask)
    else:
        o = acc / tl.where(l > 0, l, 1.0)[:, None]  # context 0 (padding) gives 0, not NaN
        tl.store(out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_splits, stride_o_seq, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_SPLITS)
    part = (seq * NUM_HEADS + head) * num_splits + s
    m = tl.load(part_max_ptr + part, mask=s < num_splits, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=s < num_splits, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # 0 for empty splits
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                  mask=(s < num_splits)[:, None], other=0.0)
    total = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + d, o.to(out_ptr.dtype.element_ty))


def default_num_splits(num_seqs: int, num_kv_heads: int, max_tiles: int, device: torch.device,
                       programs_per_sm: int = 2) -> int:
    """Splits so that seqs x kv heads x splits gives about `programs_per_sm` programs per SM,
    rounded up to a power of two (few compiled variants of the combine), and no more than the
    tiles of the longest possible context rounded up the same way. Two per SM measured best on an H100 (Llama-3.1-8B shapes): batch 64 x 4k runs
    unsplit (splitting it in 2 cost 2%), batch 1 x 32k in 64 splits (128 cost 4%)."""
    # Off CUDA (the interpreter), an H100's 132 SMs: tests then exercise the GPU's choice.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = triton.cdiv(programs_per_sm * sms, num_seqs * num_kv_heads)
    if want <= 1:
        return 1
    return min(triton.next_power_of_2(want), triton.next_power_of_2(max_tiles))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, **tunables,
) -> torch.Tensor:
    """`paged_decode_attention_cache` on a cache in the model dtype given as its two tensors
    [num_blocks, block_size, num_kv_heads, head_dim]."""
    return paged_decode_attention_cache(q, LayerKVCache(FORMATS["auto"], k_cache, v_cache), block_tables,
                                        context_lens, scale, **tunables)


def paged_decode_attention_cache(
    q: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
    scale: float, residual_slots: torch.Tensor | None = None,
    *, tile_tokens: int = 64, num_splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; cache: one layer, any --kv-cache-dtype
    (kernels/kv_format.py); block_tables: [num_seqs, max_blocks] int32; context_lens:
    [num_seqs] int32 (device; never read on the host); residual_slots: [num_seqs] int32, each
    sequence's residual slot (int4/int2 caches only). Returns [num_seqs, num_heads, head_dim].

    tile_tokens: tokens per K/V tile, a power of two, larger or smaller than block_size
    (64 x 128 dims x bf16: 16 KB of K and 16 KB of V per pipeline stage); with per-channel
    keys (int4/int2) at most block_size. num_splits: context splits per sequence; default from
    `default_num_splits`, with the block-table width as the bound on context length. Defaults
    (64 tokens, 4 warps, 3 stages) from a sweep on an H100 (benchmarks/kernel_bench.py
    --sweep, 54 configurations, bf16): within 1% of the best at both batch 64 x 4k and batch
    1 x 32k. num_stages: 3, or 5 for a quantized cache: Triton keeps (num_stages - 1) // 2
    tiles of codes in flight behind their block-table entries, and with 3 a tile's codes are
    only requested once the previous tile is done; a bf16 tile is 4x an int4 one, enough to
    keep the memory busy from fewer programs that way (from the TTGIR; timing: the --sweep of
    benchmarks/kv_quant_kernel_bench.py).
    """
    num_seqs, num_heads, head_dim = q.shape
    k_cache, v_cache = kv_codes(cache)
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert num_heads == group * num_kv_heads and head_dim == triton.next_power_of_2(head_dim) >= 16
    assert k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    if cache.fmt.kivi:  # a tile must lie in one block: one key range per channel
        tile_tokens = min(tile_tokens, block_size)
        assert block_size % tile_tokens == 0
    if num_stages is None:
        num_stages = 5 if cache.fmt.quantized else 3
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_tiles = triton.cdiv(block_tables.shape[1] * block_size, tile_tokens)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_tiles, q.device)
    split = num_splits > 1
    part_shape = (num_seqs, num_heads, num_splits) if split else (0,)
    part_max = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((*part_shape, head_dim) if split else (0,), dtype=torch.float32, device=q.device)
    fmt_args, fmt_constexprs = cache_kernel_args(cache, q.dtype, residual_slots)
    dot_dtype = q.dtype if cache.fmt.quantized else k_cache.dtype
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_max, part_sum, *fmt_args,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE_N=tile_tokens, SPLIT=split,
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", **fmt_constexprs,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _combine_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The reference, same arguments: `paged_attention_ref` on a batch of single-token queries."""
    n = q.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=q.device),
        block_tables=block_tables,
        context_lens=context_lens,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=q.device),
        query_lens=[1] * n,
        context_lens_host=context_lens.tolist(),
    )
    return paged_attention_ref(q, LayerKVCache(FORMATS["auto"], k_cache, v_cache), meta, scale)
