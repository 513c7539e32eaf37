"""Attention over the paged KV cache, for a flat batch of sequences (prefill chunks and decodes).

Each sequence brings `query_len` new tokens whose K and V are already written to the cache;
they attend causally to the sequence's `context_len` cached tokens (the new ones included),
so a query at position `p` sees keys `0..p`; with a sliding window `w`, keys `p-w+1..p`.
Soft-capping (Gemma 2) maps each scaled score `s` to `cap * tanh(s / cap)` before the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.kv_quant import (
    dequantize_fp8,
    dequantize_per_channel,
    dequantize_per_token,
)


@dataclass
class KiviPlan:
    """Where this step's K/V go in a KIVI (int4, int2) cache, and where attention finds the
    full-precision ring; see kernels/kv_format.py (engine/kivi_plan.py builds it).

    ring_tables: [num_seqs, R] int32, each sequence's ring rows in position
        order: row j holds positions ring_starts + j * block_size onward
    ring_starts: [num_seqs] int32, the first position read from the ring (a
        multiple of block_size); earlier positions are read from the quantized blocks
    ring_mapping: [num_tokens] ring row (ring row * block_size + offset) of each new
        token from its sequence's ring start on, else -1
    flush_blocks: [F] blocks that fill up this step (-1: padding, skipped)
    flush_ring / flush_prior / flush_start: [F] the block's ring row, how many of its
        tokens were written in earlier steps (they are in that row), and the flat-batch index
        of its first token written this step
    """

    ring_tables: torch.Tensor
    ring_starts: torch.Tensor
    ring_mapping: torch.Tensor
    flush_blocks: torch.Tensor
    flush_ring: torch.Tensor
    flush_prior: torch.Tensor
    flush_start: torch.Tensor


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built once by the model runner and shared by all layers.

    slot_mapping: [num_tokens] cache slot of each new token
    block_tables: [num_seqs, max_blocks] int32, padded with 0
    context_lens: [num_seqs] tokens in the cache after this step's writes
    query_start_loc: [num_seqs + 1] offsets of each sequence's tokens in the flat batch
    query_lens / context_lens_host: the same lengths as Python ints, so the CPU path never
    has to read them back from a device tensor.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    query_lens: list[int]
    context_lens_host: list[int]
    kivi: KiviPlan | None = None

    @cached_property
    def max_query_len(self) -> int:
        """Longest query in the batch, from the host list: computed once per step, not once
        per layer, for the kernels' tile choice."""
        return max(self.query_lens, default=0)

    @cached_property
    def queries_per_key(self) -> float:
        """Query tokens per cached key, over the step's keys (sum of query_len * context_len
        over sum of context_len): about how often attention reads each cached key, for the
        kernels' choice of path (kernels/triton_kv_dequant.py). Once per step, on the host."""
        keys = sum(self.context_lens_host)
        return sum(q * c for q, c in zip(self.query_lens, self.context_lens_host)) / max(keys, 1)


def paged_attention_ref(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                        sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]. A
    quantized cache is dequantized block by block as it is gathered, into q's dtype."""
    out = torch.empty_like(q)
    decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if decode:
        _decode_batch(q, cache, meta, decode, scale, sliding_window, softcap, out)
    starts = meta.query_start_loc.tolist() if len(decode) < len(meta.query_lens) else []
    for i, n in enumerate(meta.query_lens):
        if n == 1:
            continue
        ctx = meta.context_lens_host[i]
        k, v = _gather(cache, meta, [i], ctx, q.dtype)
        qi = q[starts[i] : starts[i] + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        # Query j sits at position ctx - n + j and sees keys up to and including it.
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        if sliding_window is not None:
            mask &= ~torch.ones_like(mask).tril(ctx - n - sliding_window)
        o = _attend(qi, k.transpose(1, 2), v.transpose(1, 2), mask, scale, softcap)
        out[starts[i] : starts[i] + n] = o[0].transpose(0, 1)
    return out


def _attend(q, k, v, mask, scale: float, softcap: float | None):
    """q: [B, H, n, D], k and v: [B, KVH, T, D], mask: broadcast to [B, H, n, T] or None."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _decode_batch(q, cache, meta, rows: list[int], scale: float, sliding_window: int | None,
                  softcap: float | None, out) -> None:
    """All single-token queries at once: gather their blocks, mask past each context (and
    before each window)."""
    ctx = [meta.context_lens_host[i] for i in rows]
    max_ctx = max(ctx)
    if len(rows) == len(meta.query_lens):
        tokens, lens = slice(None), meta.context_lens
    else:
        idx = torch.tensor(rows, device=q.device)
        tokens, lens = meta.query_start_loc[idx], meta.context_lens[idx]
    k, v = _gather(cache, meta, rows, max_ctx, q.dtype)  # [B, T, KVH, D]
    mask = None
    windowed = sliding_window is not None and max_ctx > sliding_window
    if min(ctx) < max_ctx or windowed:  # ragged or windowed (batch 1 without a window never is)
        pos = torch.arange(max_ctx, device=q.device)[None, :]
        valid = pos < lens[:, None]  # [B, T]
        if windowed:
            valid &= pos >= lens[:, None] - sliding_window
        # Slots past a context hold whatever was there before (even NaN): zero them, since
        # a masked score or weight times garbage can still be NaN.
        invalid = ~valid[:, :, None, None]
        k, v = k.masked_fill(invalid, 0.0), v.masked_fill(invalid, 0.0)
        mask = valid[:, None, None, :]
    qb = q[tokens].unsqueeze(2)  # [B, H, 1, D]
    o = _attend(qb, k.transpose(1, 2), v.transpose(1, 2), mask, scale, softcap)
    out[tokens] = o.squeeze(2)


def _gather(cache: LayerKVCache, meta: AttentionMetadata, rows: list[int], num_tokens: int, dtype):
    """[B, num_tokens, KVH, D] K and V of sequences `rows`, dequantized to `dtype`."""
    bs = cache.block_size
    nb = -(-num_tokens // bs)
    tables = meta.block_tables[rows, :nb].long()  # [B, nb]
    k, v = _dequantize_blocks(cache, tables.reshape(-1), dtype)
    shape = (len(rows), nb * bs, *k.shape[2:])
    k, v = k.reshape(shape), v.reshape(shape)
    if cache.fmt.kivi:
        k, v = _overlay_ring(cache, meta, rows, k, v)
    return k[:, :num_tokens], v[:, :num_tokens]


def _dequantize_blocks(cache: LayerKVCache, blocks: torch.Tensor, dtype):
    """[n, block_size, KVH, D] K and V of the given blocks."""
    fmt = cache.fmt
    if not fmt.quantized:
        return cache.k[blocks].to(dtype), cache.v[blocks].to(dtype)
    if fmt.fp8:
        k = dequantize_fp8(cache.k[blocks], cache.k_scale[blocks])
        v = dequantize_fp8(cache.v[blocks], cache.v_scale[blocks])
    else:
        v = dequantize_per_token(cache.v[blocks], cache.v_scale[blocks], cache.v_zero[blocks], fmt.bits)
        if fmt.kivi:
            k = dequantize_per_channel(cache.k[blocks], cache.k_scale[blocks], cache.k_zero[blocks], fmt.bits)
        else:
            k = dequantize_per_token(cache.k[blocks], cache.k_scale[blocks], cache.k_zero[blocks], fmt.bits)
    return k.to(dtype), v.to(dtype)


def _overlay_ring(cache: LayerKVCache, meta: AttentionMetadata, rows: list[int], k, v):
    """Positions from each sequence's ring start on come from its ring; with a
    `sink` format, position 0 before it from block 0's int8 copy."""
    bs = cache.block_size
    idx = torch.tensor(rows, device=k.device)
    begin = meta.kivi.ring_starts[idx].long()  # [B]
    pos = torch.arange(k.shape[1], device=k.device)
    rel = (pos[None, :] - begin[:, None]).clamp(min=0)  # [B, T]
    ring = meta.kivi.ring_tables[idx].long()  # [B, R]
    in_res = (pos[None, :] >= begin[:, None]) & (rel < ring.shape[1] * bs)
    row = ring.gather(1, (rel // bs).clamp(max=ring.shape[1] - 1))  # [B, T]
    res_k = cache.k_ring[row, rel % bs].to(k.dtype)  # [B, T, KVH, D]
    res_v = cache.v_ring[row, rel % bs].to(v.dtype)
    sel = in_res[:, :, None, None]
    k, v = torch.where(sel, res_k, k), torch.where(sel, res_v, v)
    if cache.fmt.sink:
        first = meta.block_tables[idx, 0].long()
        sink = dequantize_per_token(cache.sink[first], cache.sink_scale[first], cache.sink_zero[first], 8)
        quantized = (begin > 0)[:, None, None]  # [B, 1, 1]
        k[:, 0] = torch.where(quantized, sink[:, 0].to(k.dtype), k[:, 0])
        v[:, 0] = torch.where(quantized, sink[:, 1].to(v.dtype), v[:, 0])
    return k, v
