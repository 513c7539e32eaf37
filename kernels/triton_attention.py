"""Paged attention on CUDA: the Ops entry point, same arguments as attention.paged_attention_ref.

Decode-only batches go to the split-K decode kernel; a batch with any prefill goes entirely
to the prefill kernel, which handles its decode rows too. The choice uses host-side lengths
only, so neither path syncs with the device. Both read any --kv-cache-dtype, dequantizing in
registers (kernels/triton_paged_tile.py), except prefills whose queries read each cached key
many times: their contexts are dequantized once into a model-dtype scratch cache first
(kernels/triton_kv_dequant.py). A step of long fresh prompts only, over a model-dtype cache,
goes to cuDNN's fused attention instead (kernels/cudnn_prefill.py).
"""
from __future__ import annotations

import torch

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.cudnn_prefill import fresh_prefill_cudnn, fresh_prefill_fits
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.triton_attention_decode import paged_decode_attention_cache
from wattserve.kernels.triton_attention_prefill import paged_prefill_attention_cache
from wattserve.kernels.triton_kv_dequant import dense_pays_off, dequantize_contexts


def paged_attention_triton(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]."""
    if meta.max_query_len == 1:  # one token per sequence: q's rows are the sequences
        return paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale, meta.kivi,
                                            sliding_window, softcap)
    if fresh_prefill_fits(q, cache, meta, sliding_window, softcap):
        return fresh_prefill_cudnn(q, cache, meta, scale)
    if dense_pays_off(cache, meta, q.dtype):
        cache, meta = dequantize_contexts(cache, meta, q.dtype)
    return paged_prefill_attention_cache(q, cache, meta, scale, sliding_window, softcap)
