"""Write the new tokens' K and V into the cache, quantizing on the way (reference).

The Triton kernels (kernels/triton_kv_write.py) must produce the same codes and metadata.
"""
from __future__ import annotations

import torch

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.kv_quant import quantize_fp8, quantize_per_channel, quantize_per_token


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]. Token i goes to slot meta.slot_mapping[i]
    (block * block_size + offset; < 0 skips it), or for KIVI formats as `meta.kivi` says."""
    if cache.fmt.kivi:
        _write_kivi(k, v, cache, meta)
        return
    keep = meta.slot_mapping >= 0
    slots = meta.slot_mapping[keep]
    k, v = k[keep], v[keep]
    if not cache.fmt.quantized:
        _scatter(cache.k, slots, k)
        _scatter(cache.v, slots, v)
        return
    for x, codes, scale, zero in ((k, cache.k, cache.k_scale, cache.k_zero), (v, cache.v, cache.v_scale, cache.v_zero)):
        if cache.fmt.fp8:
            c, s = quantize_fp8(x)
        else:
            c, s, z = quantize_per_token(x, cache.fmt.bits)
            _scatter(zero, slots, z)
        _scatter(codes, slots, c)
        _scatter(scale, slots, s)


def _scatter(paged: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """paged [num_blocks, block_size, ...] viewed as [num_slots, ...]: rows to their slots."""
    rows = rows.to(paged.dtype)
    if paged.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernel on CPU: copy bytes
        paged, rows = paged.view(torch.uint8), rows.view(torch.uint8)
    paged.view(-1, *paged.shape[2:]).index_copy_(0, slots, rows)


def _write_kivi(k, v, cache: LayerKVCache, meta: AttentionMetadata) -> None:
    """Blocks that fill up this step are quantized whole (their earlier tokens come from the
    residual, the rest from this step's k and v); tokens from the sequence's ring start on
    go to the ring. Flushing first matters: the ring rows it reads may be overwritten
    by a later block's tokens in the same step."""
    plan = meta.kivi
    bs = cache.block_size
    for block, slot, prior, start in zip(*(t.tolist() for t in (plan.flush_blocks, plan.flush_ring,
                                                                plan.flush_prior, plan.flush_start))):
        if block < 0:
            continue
        new = bs - prior
        kb = torch.cat([cache.k_ring[slot, :prior], k[start : start + new].to(cache.k_ring.dtype)])
        vb = torch.cat([cache.v_ring[slot, :prior], v[start : start + new].to(cache.v_ring.dtype)])
        bits = cache.fmt.bits
        cache.k[block], cache.k_scale[block], cache.k_zero[block] = quantize_per_channel(kb, bits)
        cache.v[block], cache.v_scale[block], cache.v_zero[block] = quantize_per_token(vb, bits)
        if cache.fmt.sink:  # the block's first token, K and V, at int8
            cache.sink[block], cache.sink_scale[block], cache.sink_zero[block] = quantize_per_token(
                torch.stack([kb[0], vb[0]]), 8)
    keep = plan.ring_mapping >= 0
    rows = plan.ring_mapping[keep]
    _scatter(cache.k_ring, rows, k[keep])
    _scatter(cache.v_ring, rows, v[keep])
