"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

from typing import Callable

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden]; statistics in float32 as HF computes them."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the new residual stream."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def norm_before_with(rms_norm: Callable, add_rms_norm: Callable, fused: Callable | None = None) -> Callable:
    """Ops.norm_before, the norm in front of a block, over a device's norms: (x, residual, weight,
    eps, next_weight) -> (the block's input, the new residual stream); residual None means x is
    the stream (the first layer). next_weight is the one weight that reads the block's input
    (None where several do), in any format. `fused` with the same signature may take the whole
    op instead (an fp8 weight's rows quantized in the norm's kernel); it returns None where it
    does not apply."""

    def norm_before(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, next_weight):
        out = fused(x, residual, weight, eps, next_weight) if fused is not None else None
        if out is None:
            out = (rms_norm(x, weight, eps), x) if residual is None else add_rms_norm(x, residual, weight, eps)
        return out

    return norm_before
