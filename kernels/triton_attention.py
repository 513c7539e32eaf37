"""Paged attention on CUDA: the Ops entry point, same arguments as attention.paged_attention_ref.

Decode-only batches go to the split-K decode kernel; a batch with any prefill goes entirely
to the prefill kernel, which handles its decode rows too. The choice uses host-side lengths
only, so neither path syncs with the device.
"""
from __future__ import annotations

import torch

from kernels.attention import AttentionMetadata
from kernels.triton_attention_decode import paged_decode_attention
from kernels.triton_attention_prefill import paged_prefill_attention


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]."""
    if meta.max_query_len == 1:  # one token per sequence: q's rows are the sequences
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale)
