"""A quantized cache's contexts dequantized into a dense model-dtype cache, for long prefills.

Prefill attention over a quantized cache dequantizes every cached tile in registers once per
query tile (kernels/triton_paged_tile.py): an 8,192-token chunk over a 130k-token prefix
dequantizes each cached tile 256 times (32-token query tiles), and the unpacking, the scale
and zero-point corrections and the codes' trip into the tensor cores' layout made it 3.3x
slower than bf16 on an H200 (issue 23). When a step's queries read each cached key many
times, the contexts are instead dequantized once per step, here, into a scratch cache in the
model dtype (the format `auto`), and the bf16 prefill kernel attends over that. One
dequantizing pass reads the codes and writes 2 bytes per value: at 130k tokens, about 0.2 ms
per layer (at 4 TB/s) against 40 ms of attention for the chunk.

The values are the reference's (attention._gather): each block's codes dequantized in float32
and rounded to the model dtype; int4/int2 positions from the sequence's ring start on copied
from its ring, int2's position 0 from its int8 sink copy. The scratch keeps the cache's block
size; sequence i's blocks are consecutive from scratch block starts[i], its tokens at their
positions.

When: `dense_pays_off` (a step's query tokens per cached key at least DENSE_MIN_QUERIES_PER_KEY,
its scratch at most DENSE_MAX_BYTES); decodes and short chunks keep the in-register path, whose
reads are the codes' bytes alone.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import FORMATS, LayerKVCache
from wattserve.kernels.triton_paged_tile import join_planes, sink_row

# Each cached key read by this many query tokens on average before a step dequantizes the
# contexts once. H200, Llama-3.1-8B shapes, an 8k chunk over a 130k context, one layer
# (benchmarks/results/long_context_NVIDIA_H200.json): in registers 3.8x (fp8) to 6.7x (int8)
# bf16's 42.7 ms, through the scratch 1.00-1.03x with a pass of 0.26-1.19 ms. Per cached
# token the pass costs what in-register attention loses on about 10 (int8) to 65 (int4, its
# pass then the slowest) queries, so 64; a short chunk's registers path is bound by reading
# the codes (benchmarks/kv_prefill_bench.py --chunk N finds the crossover).
DENSE_MIN_QUERIES_PER_KEY = 64
# The scratch comes out of the activation reserve (engine/model_runner.py's 2 GiB): a
# 130k-token context of Llama-3.1-8B (8 kv heads x 128, bf16) takes 0.53 GB.
DENSE_MAX_BYTES = 1 << 30


def _head_dim(cache: LayerKVCache) -> int:
    return cache.k.shape[3] * 8 // cache.fmt.bits  # fp8: bits 8, a byte per channel


def dense_bytes(cache: LayerKVCache, meta: AttentionMetadata, dtype: torch.dtype) -> int:
    """Bytes of the scratch cache for `meta`'s contexts: K and V of their whole blocks."""
    bs = cache.block_size
    blocks = sum(-(-c // bs) for c in meta.context_lens_host)
    return 2 * blocks * bs * cache.k.shape[2] * _head_dim(cache) * dtype.itemsize


def dense_pays_off(cache: LayerKVCache, meta: AttentionMetadata, dtype: torch.dtype) -> bool:
    return (cache.fmt.quantized and meta.queries_per_key >= DENSE_MIN_QUERIES_PER_KEY
            and dense_bytes(cache, meta, dtype) <= DENSE_MAX_BYTES)


@triton.jit
def _codes(ptr, block, t, h, stride_block, stride_tok, stride_head, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
           FP8: tl.constexpr):
    """Codes [T, HEAD_DIM] of kv head h in block `block`, float32. Sub-byte codes: each byte
    read once, its codes split into planes (plane i: bits i * BITS, the channels c with
    c % per byte == i) and interleaved back into channel order (`join_planes`)."""
    PER: tl.constexpr = 1 if FP8 else 8 // BITS
    raw = tl.load(ptr + block * stride_block + t[:, None] * stride_tok + h * stride_head
                  + tl.arange(0, HEAD_DIM // PER)[None, :])
    if FP8:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    planes = ()
    for i in tl.static_range(PER):
        planes = planes + (((raw >> (i * BITS)) & ((1 << BITS) - 1)).to(tl.float32),)
    return join_planes(planes)


@triton.jit
def _per_token(ptr, block, t, h, stride_block, stride_tok):
    """Per-token metadata [T] of kv head h in block `block`, float32."""
    return tl.load(ptr + block * stride_block + t * stride_tok + h).to(tl.float32)


@triton.jit
def _dequantize_kernel(
    k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, k_ring_ptr, v_ring_ptr,
    ring_tables_ptr, ring_starts_ptr, sink_ptr, sink_scale_ptr, sink_zero_ptr,
    block_tables_ptr, context_lens_ptr, dense_starts_ptr, k_out_ptr, v_out_ptr,
    stride_table, stride_ring_table, stride_c_block, stride_c_tok, stride_c_head, stride_m_block, stride_m_tok,
    stride_kc_block, stride_r_slot, stride_r_tok, stride_r_head, stride_o_block, stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr,
    KIVI: tl.constexpr, SINK: tl.constexpr,
):
    j = tl.program_id(0)  # the sequence's block
    seq = tl.program_id(1)
    h = tl.program_id(2)
    num_kv_heads = tl.num_programs(2)
    ctx = tl.load(context_lens_ptr + seq)
    if j * BLOCK_SIZE >= ctx:
        return
    t = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, HEAD_DIM)
    out_ty = k_out_ptr.dtype.element_ty
    dst = (tl.load(dense_starts_ptr + seq) + j).to(tl.int64)
    out = dst * stride_o_block + t[:, None] * stride_o_tok + h * stride_o_head + d[None, :]
    written = (j * BLOCK_SIZE + t < ctx)[:, None]  # slots past the context may hold NaN scales
    ring_start = ctx
    if KIVI:
        ring_start = tl.load(ring_starts_ptr + seq)
    if j * BLOCK_SIZE >= ring_start:  # a ring row, in the model dtype already
        row = tl.load(ring_tables_ptr + seq * stride_ring_table + j - ring_start // BLOCK_SIZE).to(tl.int64)
        src = row * stride_r_slot + t[:, None] * stride_r_tok + h * stride_r_head + d[None, :]
        k = tl.load(k_ring_ptr + src, mask=written, other=0.0).to(out_ty)
        v = tl.load(v_ring_ptr + src, mask=written, other=0.0).to(out_ty)
    else:
        block = tl.load(block_tables_ptr + seq * stride_table + j).to(tl.int64)
        kc = _codes(k_ptr, block, t, h, stride_c_block, stride_c_tok, stride_c_head, HEAD_DIM, BITS, FP8)
        vc = _codes(v_ptr, block, t, h, stride_c_block, stride_c_tok, stride_c_head, HEAD_DIM, BITS, FP8)
        v_scale = _per_token(v_scale_ptr, block, t, h, stride_m_block, stride_m_tok)
        if FP8:
            kf = kc * _per_token(k_scale_ptr, block, t, h, stride_m_block, stride_m_tok)[:, None]
            vf = vc * v_scale[:, None]
        else:
            v_zero = _per_token(v_zero_ptr, block, t, h, stride_m_block, stride_m_tok)
            vf = (vc - v_zero[:, None]) * v_scale[:, None]
            if KIVI:  # per channel over the block: x = c * s + m
                ch = block * stride_kc_block + h * HEAD_DIM + d
                kf = kc * tl.load(k_scale_ptr + ch).to(tl.float32)[None, :] + tl.load(k_zero_ptr + ch).to(
                    tl.float32)[None, :]
            else:
                k_zero = _per_token(k_zero_ptr, block, t, h, stride_m_block, stride_m_tok)
                kf = (kc - k_zero[:, None]) * _per_token(k_scale_ptr, block, t, h, stride_m_block, stride_m_tok)[:, None]
        k = kf.to(out_ty)
        v = vf.to(out_ty)
        if SINK:
            if j == 0:  # position 0 from its int8 copy: sink [nb, 2 (K, V), h, d]
                first = (block * 2) * num_kv_heads + h
                sink_k = sink_row(sink_ptr, sink_scale_ptr, sink_zero_ptr, first, out_ty, HEAD_DIM).to(out_ty)
                sink_v = sink_row(sink_ptr, sink_scale_ptr, sink_zero_ptr, first + num_kv_heads, out_ty,
                                  HEAD_DIM).to(out_ty)
                k = tl.where(t[:, None] == 0, sink_k[None, :], k)
                v = tl.where(t[:, None] == 0, sink_v[None, :], v)
    tl.store(k_out_ptr + out, k, mask=written)
    tl.store(v_out_ptr + out, v, mask=written)


def dequantize_contexts(cache: LayerKVCache, meta: AttentionMetadata,
                        dtype: torch.dtype) -> tuple[LayerKVCache, AttentionMetadata]:
    """Every sequence's context [0, context_len) of a quantized `cache` in `dtype`: (a cache of
    format `auto` [blocks, block_size, num_kv_heads, head_dim] and `meta` with block tables
    into it, no KIVI plan). Sizes from the host lengths; nothing read back from the device."""
    fmt, bs = cache.fmt, cache.block_size
    num_kv_heads, head_dim = cache.k.shape[2], _head_dim(cache)
    device = cache.k.device
    counts = [-(-c // bs) for c in meta.context_lens_host]
    k = torch.empty(sum(counts), bs, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.empty_like(k)
    blocks = (meta.context_lens + (bs - 1)) // bs
    starts = (torch.cumsum(blocks, 0) - blocks).to(torch.int32)
    tables = starts[:, None] + torch.arange(max(counts, default=0), dtype=torch.int32, device=device)
    dense = AttentionMetadata(meta.slot_mapping, tables, meta.context_lens, meta.query_start_loc, meta.query_lens,
                              meta.context_lens_host)
    if not counts or max(counts) == 0:
        return LayerKVCache(FORMATS["auto"], k, v), dense
    codes_k, codes_v = (cache.k.view(torch.uint8), cache.v.view(torch.uint8)) if fmt.fp8 else (cache.k, cache.v)
    stand_in = cache.v_scale  # for tensors a format lacks; its constexpr branches never read them
    if fmt.kivi:
        plan = meta.kivi
        ring = [cache.k_ring, cache.v_ring, plan.ring_tables, plan.ring_starts]
        ring_strides = [plan.ring_tables.stride(0)]
        res_strides = [cache.k_scale.stride(0), *cache.k_ring.stride()[:3]]
    else:
        ring, ring_strides, res_strides = [stand_in] * 4, [0], [0] * 4
    sink = [cache.sink, cache.sink_scale, cache.sink_zero] if fmt.sink else [stand_in] * 3
    zeros = (stand_in, stand_in) if fmt.fp8 else (cache.k_zero, cache.v_zero)
    _dequantize_kernel[(max(counts), len(counts), num_kv_heads)](
        codes_k, codes_v, cache.k_scale, zeros[0], cache.v_scale, zeros[1], *ring, *sink,
        meta.block_tables, meta.context_lens, starts, k, v,
        meta.block_tables.stride(0), *ring_strides, *cache.k.stride()[:3], *cache.v_scale.stride()[:2],
        *res_strides, *k.stride()[:3],
        HEAD_DIM=head_dim, BLOCK_SIZE=bs, BITS=fmt.bits, FP8=fmt.fp8, KIVI=fmt.kivi, SINK=fmt.sink, num_warps=4,
    )
    return LayerKVCache(FORMATS["auto"], k, v), dense
