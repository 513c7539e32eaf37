"""Gated MLP activations over a fused [gate | up] projection: SwiGLU (silu) and GeGLU (tanh gelu)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Gemma's GeGLU; gate_up: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gated_linear_with(silu_and_mul: Callable, gelu_tanh_and_mul: Callable, linear: Callable,
                      fused: Callable | None = None) -> Callable:
    """Ops.gated_linear, the MLP's second half, over a device's ops: (gate_up: [num_tokens,
    2 * intermediate], weight [hidden, intermediate] of any format, gelu_tanh: GeGLU, else
    SwiGLU) -> linear(act(gate) * up, weight). `fused(gate_up, weight, gelu_tanh)` may take
    the whole op instead (an fp8 weight's activation quantized in the activation kernel);
    it returns None where it does not apply."""

    def gated_linear(gate_up: torch.Tensor, weight, gelu_tanh: bool) -> torch.Tensor:
        out = fused(gate_up, weight, gelu_tanh) if fused is not None else None
        if out is None:
            out = linear((gelu_tanh_and_mul if gelu_tanh else silu_and_mul)(gate_up), weight)
        return out

    return gated_linear
