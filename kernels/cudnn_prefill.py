"""Fresh prompts' causal attention through cuDNN's fused attention (torch SDPA's cuDNN backend).

A step whose sequences all prefill from position 0 (no cached prefix, no decode rows) is a
plain causal attention per sequence, the case NVIDIA's Hopper kernels are built for: on an
H200, one 4,096-token prompt of Llama-3.1-8B's heads (32 q, 8 kv, head_dim 128) ran at
518 TFLOP/s in cuDNN against 354 in kernels/triton_attention_prefill.py, GQA native in
both, each within 1.9e-3 (relative, bf16) of FlashAttention's output. Every
other step (prefix-cached or chunked prompts, mixed decodes, quantized caches whose reads
must see the stored codes, sliding windows, soft-capping) keeps the Triton kernels.

K and V are gathered from the paged cache the rotary kernel has just written (one copy of
the sequence's blocks), so the result is the attention over exactly what later steps read.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import LayerKVCache

MIN_TOKENS = 512  # shorter fresh prompts keep the Triton kernel: the launches would dominate


@functools.cache
def _cudnn_attention_on(device: torch.device) -> bool:
    return torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled() \
        and torch.cuda.get_device_capability(device) >= (9, 0)


def fresh_prefill_fits(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                       sliding_window: int | None, softcap: float | None) -> bool:
    """Whether this step's attention takes the cuDNN path (module doc). Host lengths only."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not cache.fmt.quantized
            and sliding_window is None and softcap is None and q.shape[-1] <= 128
            and meta.context_lens_host == meta.query_lens
            and min(meta.query_lens, default=0) >= MIN_TOKENS and _cudnn_attention_on(q.device))


def fresh_prefill_cudnn(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] of sequences that `fresh_prefill_fits`;
    returns [num_tokens, num_heads, head_dim]."""
    block_size = cache.k.shape[1]
    outs = []
    start = 0
    for i, length in enumerate(meta.query_lens):
        blocks = meta.block_tables[i, : -(-length // block_size)]
        k, v = (c.index_select(0, blocks).flatten(0, 1)[:length] for c in (cache.k, cache.v))
        # On CPU (the tests: gathering, GQA, causality) PyTorch's own backend runs the call.
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
            o = F.scaled_dot_product_attention(
                q[start:start + length].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += length
    return outs[0] if len(outs) == 1 else torch.cat(outs)
