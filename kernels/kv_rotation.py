"""Rotating each head's K and V before they are quantized (QuaRot's online rotation).

A head's queries meet its keys only through q . k, and its values leave attention only
through p @ v, so one orthogonal matrix R per head changes nothing exact:
(q R) . (k R) = q . k and (p @ (v R)) R^T = p @ v. The caches of the formats with
`KVFormat.rotated` hold k R and v R; the attention kernels take q R and return o R, and know
nothing of R. What R changes is what the quantizer sees:
- fp8's error is relative, per element, so the error of a score, sum_i q_i k_i e_i, is led by
  the channels where q and k are both large: keys and queries share outlier channels. R
  spreads every channel over all of them, and no single product leads.
- int2's per-channel key ranges (KIVI) cover fewer, milder extremes after R.
On the default model, R lowers fp8's KL from the unquantized cache (5.04e-3 -> 3.80e-3; over
4,096 tokens the two perplexities are within noise) and int2's perplexity increase, and raises
int4's perplexity increase (its 16 levels already fit per-channel ranges well; its KL falls),
so int4 and int8 are stored as they are: compare
`fp8_e4m3` with `fp8_e4m3_unrotated`, `int2` with `int2_unrotated` and `int4` with
`int4_rotated` in benchmarks/results/kv_quant_what_if_cpu.json.

R is the normalized Sylvester-Hadamard matrix where head_dim is a power of two (its entries
are +-1/sqrt(d), so R costs one small matmul per tensor and is exact to the dtype's rounding),
else a fixed random orthogonal matrix.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # kv_format imports this module
    from wattserve.kernels.kv_format import LayerKVCache


@functools.cache
def _rotation64(head_dim: int) -> torch.Tensor:
    if head_dim & (head_dim - 1) == 0:
        r = torch.ones(1, 1, dtype=torch.float64)
        while r.shape[0] < head_dim:
            r = torch.cat([torch.cat([r, r], 1), torch.cat([r, -r], 1)])
        return r / head_dim**0.5
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
    return q


def rotation(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthogonal [head_dim, head_dim] R, on `device` in `dtype`. allocate_layer puts it
    in the cache (LayerKVCache.rotation), so no copy to the GPU happens inside a CUDA graph."""
    return _rotation64(head_dim).to(device=device, dtype=dtype)


def rotate_into_cache(cache: LayerKVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v) [tokens, heads, head_dim] after RoPE -> in the basis of `cache`."""
    if not cache.fmt.rotated:
        return q, k, v
    r = cache.rotation
    return q @ r, k @ r, v @ r


def rotate_out_of_cache(cache: LayerKVCache, o: torch.Tensor) -> torch.Tensor:
    """Attention output [tokens, heads, head_dim] over `cache` -> the model's basis."""
    if not cache.fmt.rotated:
        return o
    return o @ cache.rotation.T


def in_model_basis(attention: Callable) -> Callable:
    """An Ops.paged_attention from a kernel that works in the cache's basis."""

    @functools.wraps(attention)
    def paged_attention(q, cache, meta, scale, **variants):
        return rotate_out_of_cache(cache, attention(q, cache, meta, scale, **variants))

    return paged_attention
