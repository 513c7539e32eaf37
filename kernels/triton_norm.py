"""Triton RMSNorm and fused add + RMSNorm. References: norm.rms_norm_ref, norm.add_rms_norm_ref.
Either can also quantize its rows per token to fp8 for a W8A8 GEMM (`rms_norm_fp8_triton`),
whose oracle is the plain kernel followed by triton_token_quant.py's quantizer.

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
from wattserve.kernels.triton_kv_write import native_fp8
from wattserve.kernels.triton_token_quant import MAX_ONE_PASS, empty_fp8_rows, quantize_row
from wattserve.kernels.weight_format import FP8_MAX


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scales_ptr,
    stride_x, stride_res, stride_out, stride_res_out, hidden, eps,
    ADD_RESIDUAL: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, NATIVE_FP8: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
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
    if FP8:  # out_ptr: codes. The row rounded to x's dtype, as the plain norm stores it, then
        # quantized as the token quantizer quantizes that stored row (padding is 0: w's is).
        codes, scale = quantize_row(y.to(x.dtype).to(tl.float32), FP8_MAX, NATIVE_FP8)
        tl.store(out_ptr + row * stride_out + cols, codes, mask=mask)
        tl.store(scales_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, res_out, scales=None):
    """scales given: `out` takes fp8 codes (as bytes) and `scales` the rows' scales."""
    hidden = x.shape[-1]
    assert x.stride(-1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    res, res_out = (residual, res_out) if residual is not None else (x, x)
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, res_out, x if scales is None else scales,
        x.stride(0), res.stride(0), out.stride(0), res_out.stride(0), hidden, eps,
        ADD_RESIDUAL=residual is not None, FP8=scales is not None, FP8_MAX=FP8_MAX,
        NATIVE_FP8=native_fp8(x.device),
        BLOCK=block, PDL=pdl_enabled(x.device),
        # About 8 elements (16 bytes of bf16) per thread and load. The fp8 variant keeps these
        # warps: the same layout sums the squares in the same order, so rstd is the plain one's.
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


def rms_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x), or rms_norm(x + residual), quantized per token for the W8A8 GEMM in the same
    pass: the codes and scales of `quantize_per_token_fp8_triton` applied to rms_norm_triton's
    (add_rms_norm_triton's) rows, without those rows' round trip through memory (written in
    the model's dtype, then read back to quantize). x, residual: [num_tokens, hidden <=
    MAX_ONE_PASS] -> (float8_e4m3fn [num_tokens, hidden], float32 scales [num_tokens, 1]).

    With a residual, x + residual overwrites `residual` IN PLACE, as add_rms_norm_triton
    writes it; x itself is never written.
    """
    hidden = x.shape[-1]
    assert weight.dtype == x.dtype and hidden <= MAX_ONE_PASS, "rows rounded to x's dtype, held in registers"
    codes, scales = empty_fp8_rows(x.shape[0], hidden, x.device)
    if x.shape[0]:
        _launch(x, residual, weight, eps, codes, residual, scales)
    return codes.view(torch.float8_e4m3fn), scales
