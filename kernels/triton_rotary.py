"""Triton rotary embedding for q and k together, and fused with the KV write for an
unquantized cache; both optionally norm each head first (Qwen3's q/k norms). References:
rotary.apply_rotary_ref (after rotary.norm_heads_ref), rotary.rotary_write_kv_ref.

One program per token: the token's cos/sin row is read once and applied to all its query
and key heads (HF "rotate half": x1, x2 are the two halves of each head). The fused kernel
stores the rotated key straight into its cache slot, with the value beside it: in a batch-1
decode step every kernel is a few microseconds of launch and latency, so one kernel instead
of two per layer is worth ~1.5 us x 32 layers (benchmarks/results/decode_profile_*.json).
The per-head norms ride along for the same reason: a head is already in registers, and two
separate norm launches per layer cost ~3 us (Qwen3-30B-A3B on the H200:
benchmarks/results/moe_*.json, decode_kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.kv_rotation import rotate_into_cache
from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs
from wattserve.kernels.rotary import HeadNorm
from wattserve.kernels.triton_kv_write import write_kv_triton


@triton.jit
def _rotated_heads(ptr, stride_head, cos, sin, norm_w_ptr, eps, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """The heads at ptr, normed (NORM: weight at norm_w_ptr) and rotated: (first halves,
    second halves, their [heads, half] mask)."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    p1 = ptr + h * stride_head + i
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:
        # Rounded where norm.rms_norm_ref rounds: the normed head to the input dtype, times
        # the weight, rounded again before the rotation reads it.
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(norm_w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
        a = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        b = ((b * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    return (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype), mask


@triton.jit
def _rotate_heads(ptr, stride_head, cos, sin, norm_w_ptr, eps, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """Norm (NORM) and rotate the heads at ptr in place."""
    y1, y2, mask = _rotated_heads(ptr, stride_head, cos, sin, norm_w_ptr, eps, NUM_HEADS, HALF, BLOCK_HEADS,
                                  BLOCK_HALF, NORM)
    p1 = ptr + tl.arange(0, BLOCK_HEADS)[:, None] * stride_head + tl.arange(0, BLOCK_HALF)[None, :]
    tl.store(p1, y1, mask=mask)
    tl.store(p1 + HALF, y2, mask=mask)


@triton.jit
def _token_cos_sin(pos_ptr, cos_sin_ptr, tok, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pos = tl.load(pos_ptr + tok)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _token_cos_sin(pos_ptr, cos_sin_ptr, tok, stride_cs, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + tok * stride_q_tok, stride_q_head, cos, sin, q_norm_ptr, eps, NUM_HEADS, HALF,
                  BLOCK_HEADS, BLOCK_HALF, NORM)
    _rotate_heads(k_ptr + tok * stride_k_tok, stride_k_head, cos, sin, k_norm_ptr, eps, NUM_KV_HEADS, HALF,
                  BLOCK_KV_HEADS, BLOCK_HALF, NORM)


def _norm_args(q: torch.Tensor, head_norm: HeadNorm | None) -> tuple:
    """The kernels' (q_norm_ptr, k_norm_ptr, eps) arguments; q stands in when there is no norm."""
    if head_norm is None:
        return q, q, 0.0
    head_dim = q.shape[-1]
    assert head_norm.q_weight.shape == head_norm.k_weight.shape == (head_dim,)
    assert head_norm.q_weight.is_contiguous() and head_norm.k_weight.is_contiguous()
    return head_norm.q_weight, head_norm.k_weight, head_norm.eps


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    head_norm: HeadNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] (any
    token/head strides, last dim contiguous); positions: [num_tokens] int64; cos_sin:
    [max_positions, head_dim] float32; head_norm: each head normed first, or None. Norm
    statistics and rotation in float32.

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
        q, k, positions, cos_sin, *_norm_args(q, head_norm),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half,
        BLOCK_HEADS=triton.next_power_of_2(num_heads), BLOCK_KV_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), NORM=head_norm is not None, num_warps=4,
    )
    return q, k


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_cs,
    stride_c_block, stride_c_tok, stride_c_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok)
    cos, sin = _token_cos_sin(pos_ptr, cos_sin_ptr, tok, stride_cs, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + tok * stride_q_tok, stride_q_head, cos, sin, q_norm_ptr, eps, NUM_HEADS, HALF,
                  BLOCK_HEADS, BLOCK_HALF, NORM)
    k1, k2, mask = _rotated_heads(k_ptr + tok * stride_k_tok, stride_k_head, cos, sin, k_norm_ptr, eps,
                                  NUM_KV_HEADS, HALF, BLOCK_KV_HEADS, BLOCK_HALF, NORM)
    h = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    v_src = v_ptr + tok * stride_v_tok + h * stride_v_head + i
    v1 = tl.load(v_src, mask=mask)
    v2 = tl.load(v_src + HALF, mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_tok + h * stride_c_head + i
    store = mask & (slot >= 0)  # slot < 0: a padding token (CUDA-graph batch), slot untouched
    tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty), mask=store)
    tl.store(k_cache_ptr + dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=store)
    tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=store)
    tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=store)


def rotary_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cos_sin: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                           head_norm: HeadNorm | None = None) -> torch.Tensor:
    """The Ops entry point, same arguments as rotary.rotary_write_kv_ref: norm each head
    (head_norm), rotate q (IN PLACE, returned) and k, write k and v to the cache. An
    unquantized cache takes the fused kernel; a quantized one norms and rotates, then
    quantizes on write (kernels/triton_kv_write.py)."""
    if cache.fmt.quantized:
        return rotary_then_write_kv(q, k, v, positions, cos_sin, cache, meta, head_norm)
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos_sin.stride(-1) == 1
    assert cache.k.stride() == cache.v.stride() and cache.k.stride(-1) == 1
    if num_tokens == 0:
        return q
    half, num_kv_heads = head_dim // 2, k.shape[1]
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin, meta.slot_mapping, cache.k, cache.v, *_norm_args(q, head_norm),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_SIZE=cache.k.shape[1],
        BLOCK_HEADS=triton.next_power_of_2(num_heads), BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), NORM=head_norm is not None, PDL=pdl_enabled(q.device),
        num_warps=4, launch_pdl=pdl_enabled(q.device),
    )
    return q


def rotary_then_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                         head_norm: HeadNorm | None = None) -> torch.Tensor:
    """The two kernels in turn: norm (head_norm) and rotate q and k (in place), then write
    (quantize) k and v; returns q in the cache's basis (kernels/kv_rotation.py)."""
    q, k = apply_rotary_triton(q, k, positions, cos_sin, head_norm)
    q, k, v = rotate_into_cache(cache, q, k, v)
    write_kv_triton(k, v, cache, meta)
    return q
