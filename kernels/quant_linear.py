"""The linear op over any weight format; PyTorch references (the CPU path).

`linear_ref(x, weight, bias)` takes a dense tensor, a QuantizedWeight or QuantizedParts, so
the model calls one op whatever its weights are stored as.
"""
from __future__ import annotations

from typing import Callable

import torch

from wattserve.kernels.weight_format import QuantizedParts, QuantizedWeight, dequantize, quantize_per_token_fp8


def quant_linear_ref(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype: dequantize, then matmul in float32. fp8 weights
    quantize x per token first, as the W8A8 GEMM on the GPU does."""
    xf = x.float()
    if w.kind == "fp8":
        codes, scales = quantize_per_token_fp8(xf)
        xf = codes.float() * scales
    return torch.nn.functional.linear(xf, dequantize(w)).to(x.dtype)


def for_any_weight(dense: Callable, quantized: Callable) -> Callable:
    """The Ops.linear signature over `dense(x, w, bias)` and `quantized(x, w: QuantizedWeight)`:
    stacked parts run one by one, a quantized layer's bias is added last."""

    def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):
            return dense(x, weight, bias)
        if isinstance(weight, QuantizedParts):
            out = torch.cat([quantized(x, part) for part in weight], dim=-1)
        else:
            out = quantized(x, weight)
        return out if bias is None else out + bias

    return linear


linear_ref = for_any_weight(torch.nn.functional.linear, quant_linear_ref)
