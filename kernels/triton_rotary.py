"""Triton rotary embedding for q and k together. Reference: rotary.apply_rotary_ref.

One program per token: the token's cos/sin row is read once and applied to all its query
and key heads (HF "rotate half": x1, x2 are the two halves of each head).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(ptr, stride_head, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    p1 = ptr + h * stride_head + i
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(p1 + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0)
    _rotate_heads(q_ptr + tok * stride_q_tok, stride_q_head, cos, sin, NUM_HEADS, HALF, BLOCK_HEADS, BLOCK_HALF)
    _rotate_heads(k_ptr + tok * stride_k_tok, stride_k_head, cos, sin, NUM_KV_HEADS, HALF, BLOCK_KV_HEADS, BLOCK_HALF)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] (any
    token/head strides, last dim contiguous); positions: [num_tokens] int64; cos_sin:
    [max_positions, head_dim] float32. Rotation in float32.

    IN PLACE: q and k are overwritten and returned. In the model they are fresh views of
    this layer's qkv projection, read only after the rotation.
    """
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[-1] == head_dim
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half,
        BLOCK_HEADS=triton.next_power_of_2(num_heads), BLOCK_KV_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
    return q, k
