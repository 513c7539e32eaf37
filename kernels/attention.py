"""Attention over the paged KV cache, for a flat batch of sequences (prefill chunks and decodes).

Each sequence brings `query_len` new tokens whose K and V are already written to the cache;
they attend causally to the sequence's `context_len` cached tokens (the new ones included),
so a query at position `p` sees keys `0..p`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


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

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @cached_property
    def max_query_len(self) -> int:
        """Longest query in the batch, from the host list: computed once per step, not once
        per layer, for the kernels' tile choice."""
        return max(self.query_lens, default=0)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]."""
    out = torch.empty_like(q)
    decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if decode:
        _decode_batch(q, k_cache, v_cache, meta, decode, scale, out)
    starts = meta.query_start_loc.tolist() if len(decode) < len(meta.query_lens) else []
    for i, n in enumerate(meta.query_lens):
        if n == 1:
            continue
        ctx = meta.context_lens_host[i]
        k, v = _gather(k_cache, v_cache, meta.block_tables[i : i + 1], ctx)
        qi = q[starts[i] : starts[i] + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        # Query j sits at position ctx - n + j and sees keys up to and including it.
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        o = F.scaled_dot_product_attention(
            qi, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[starts[i] : starts[i] + n] = o[0].transpose(0, 1)
    return out


def _decode_batch(q, k_cache, v_cache, meta, rows: list[int], scale: float, out) -> None:
    """All single-token queries at once: gather their blocks, mask past each context."""
    ctx = [meta.context_lens_host[i] for i in rows]
    max_ctx = max(ctx)
    if len(rows) == len(meta.query_lens):
        tokens, tables, lens = slice(None), meta.block_tables, meta.context_lens
    else:
        idx = torch.tensor(rows, device=q.device)
        tokens, tables, lens = meta.query_start_loc[idx], meta.block_tables[idx], meta.context_lens[idx]
    k, v = _gather(k_cache, v_cache, tables, max_ctx)  # [B, T, KVH, D]
    mask = None
    if min(ctx) < max_ctx:  # ragged: mask each sequence's tail (batch 1 never is)
        valid = torch.arange(max_ctx, device=q.device)[None, :] < lens[:, None]  # [B, T]
        # Slots past a context hold whatever was there before (even NaN): zero them, since
        # a masked score or weight times garbage can still be NaN.
        invalid = ~valid[:, :, None, None]
        k, v = k.masked_fill(invalid, 0.0), v.masked_fill(invalid, 0.0)
        mask = valid[:, None, None, :]
    qb = q[tokens].unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(
        qb, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True,
    )
    out[tokens] = o.squeeze(2)


def _gather(k_cache, v_cache, tables: torch.Tensor, num_tokens: int):
    """[B, num_tokens, KVH, D] views of K and V for sequences given their block tables."""
    block_size = k_cache.shape[1]
    nb = -(-num_tokens // block_size)
    blocks = tables[:, :nb].reshape(-1)
    shape = (tables.shape[0], nb * block_size, *k_cache.shape[2:])
    k = k_cache.index_select(0, blocks).view(shape)[:, :num_tokens]
    v = v_cache.index_select(0, blocks).view(shape)[:, :num_tokens]
    return k, v
