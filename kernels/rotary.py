"""Rotary position embedding (HF "rotate half" layout), with Llama-3.1, linear and Phi-3's
longrope scaling."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.kv_rotation import rotate_into_cache
from wattserve.kernels.kv_write import write_kv_ref
from wattserve.kernels.norm import rms_norm_ref


@dataclass(frozen=True)
class HeadNorm:
    """The RMSNorm of each query and key head before the rotation (Qwen3, Qwen3-MoE, Gemma 3;
    not OLMo 2's, which spans the whole projection). q_weight, k_weight: [head_dim]."""
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, float64 for an exact cache."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: low frequencies are slowed by `factor`, high ones kept, the band between blended.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32 table: cos in the first half, sin in the second, on
    the default device (the model builds it under `torch.device(...)`)."""
    positions = torch.arange(max_positions, dtype=torch.float64)
    if scaling is not None and scaling["rope_type"] == "longrope":
        return _longrope_cos_sin(head_dim, theta, scaling, positions)
    freqs = torch.outer(positions, rope_inv_freq(head_dim, theta, scaling))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def _longrope_cos_sin(head_dim: int, theta: float, scaling: dict[str, Any],
                      positions: torch.Tensor) -> torch.Tensor:
    """Phi-3: frequencies divided per dimension by the short factors inside the original
    context and by the long ones beyond it, cos and sin scaled by the attention factor.

    Chosen by the token's position, so the K/V already cached never change. transformers
    instead drops its cache when a sequence outgrows the original context and computes the
    whole sequence again with the long factors; inside the original context the two agree
    exactly, past it tokens differ slightly (vLLM also keeps the cache, switching per batch).
    """
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    original = scaling["original_max_position_embeddings"]
    short = torch.outer(positions, base / torch.tensor(scaling["short_factor"], dtype=torch.float64))
    long = torch.outer(positions, base / torch.tensor(scaling["long_factor"], dtype=torch.float64))
    freqs = torch.where((positions < original)[:, None], short, long)
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scaling["attention_factor"]).float()


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim],
    positions: [num_tokens]. Rotation in float32, result in the input dtype."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def norm_heads_ref(q: torch.Tensor, k: torch.Tensor,
                   head_norm: HeadNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim], each
    head normed by `head_norm` (unchanged when None)."""
    if head_norm is None:
        return q, k
    return rms_norm_ref(q, head_norm.q_weight, head_norm.eps), rms_norm_ref(k, head_norm.k_weight, head_norm.eps)


def rotary_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                        head_norm: HeadNorm | None = None) -> torch.Tensor:
    """Norm each q and k head (when `head_norm` is given), rotate q and k, write k and v to
    the cache (kv_write.write_kv_ref); return rotated q, in the cache's basis
    (kernels/kv_rotation.py). One op because the CUDA path fuses them all
    (kernels/triton_rotary.py)."""
    q, k = apply_rotary_ref(*norm_heads_ref(q, k, head_norm), positions, cos_sin)
    q, k, v = rotate_into_cache(cache, q, k, v)
    write_kv_ref(k, v, cache, meta)
    return q
