"""Triton KV write: the new tokens' K and V into their cache slots. Reference: kv_write.write_kv_ref.

One program per token stores that token's whole [num_kv_heads, head_dim] row of K and of V,
so a quantizing variant only changes `_to_cache`: it can take a per-(token, head) absmax
along the last axis right there and store a scale beside the codes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _to_cache(x, cache_ptr):
    # The one place that encodes a value for the cache (fp8/int8/int4 with scales goes here).
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_tok, stride_c_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    # The three loads are independent, so all are in flight at once.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    k = tl.load(k_ptr + tok * stride_k_tok + h * stride_k_head + d, mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + h * stride_v_head + d, mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_tok + h * stride_c_head + d
    store = mask & (slot >= 0)  # slot < 0: a padding token (CUDA-graph batch), slot untouched
    tl.store(k_cache_ptr + dst, _to_cache(k, k_cache_ptr), mask=store)
    tl.store(v_cache_ptr + dst, _to_cache(v, v_cache_ptr), mask=store)


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (any token/head strides, last dim
    contiguous); caches: [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping:
    [num_tokens] int64, a slot < 0 skips its token."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4,
    )
