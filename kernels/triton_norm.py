"""Triton RMSNorm and fused add + RMSNorm. References: norm.rms_norm_ref, norm.add_rms_norm_ref.

One program per token row, the whole row in registers, statistics in float32. Intermediate
roundings follow the reference (sum rounded to the input dtype before the statistics, the
normalized row rounded before the weight multiply), so the two agree to the last bit in
most elements rather than merely within tolerance.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out, hidden, eps,
    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, res_out):
    hidden = x.shape[-1]
    assert x.stride(-1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    res, res_out = (residual, res_out) if residual is not None else (x, x)
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, res_out,
        x.stride(0), res.stride(0), out.stride(0), res_out.stride(0), hidden, eps,
        ADD_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl_enabled(x.device),
        # About 8 elements (16 bytes of bf16) per thread and load.
        num_warps=min(max(block // 256, 1), 16), launch_pdl=pdl_enabled(x.device),
    )


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden] -> a new [num_tokens, hidden] tensor. Out of place on purpose:
    the model keeps the first layer's input as the residual stream."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.shape[0]:
        _launch(x, None, weight, eps, out, None)
    return out


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden] -> (rms_norm(x + residual), x + residual).

    IN PLACE: the new residual overwrites `residual` and the normed rows overwrite `x`, and
    those two tensors are returned. The model never reads either input again after the call
    (both are rebound to the results), and each program reads its row before writing it.
    """
    assert weight.dtype == x.dtype, "in-place output keeps x's dtype"
    if x.shape[0]:
        _launch(x, residual, weight, eps, x, residual)
    return x, residual
