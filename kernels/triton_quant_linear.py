"""Triton dequantize-in-the-loop matmul: out = x @ dequantize(w).T for every format of
kernels/weight_format.py. Reference: kernels/quant_linear.py `quant_linear_ref`.

Each program owns a BLOCK_M x BLOCK_N output tile and streams its weight rows over all of K
in their stored format (4 or 8 bits a weight plus a scale per group), dequantizing in
registers before a tensor-core dot in x's dtype; the weight is never written out dense. With
BLOCK_M = 16 (decode batches) it is a weight stream like kernels/triton_gemv.py, so its speed
bound is the stored bytes, a quarter of bf16's for 4-bit codes. Larger batches take
BLOCK_M = 64 tiles; fp8 there goes to the fp8 tensor cores instead (torch._scaled_mm,
activations quantized per token) where the GPU has them. From DENSE_MIN_ROWS rows (prefill
chunks) the other formats are dequantized to x's dtype in one pass (`dequantize_triton`) and
multiplied by cuBLAS: for M rows the pass writes 2 bytes a weight once, where the matmul does
2M FLOPs a weight, so it costs a few percent of a prefill chunk, and the dense matmul runs near
the tensor cores' peak where the dequantize-in-the-loop tiles do not.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from wattserve.kernels.triton_activation import act_and_mul_fp8_triton
from wattserve.kernels.triton_norm import rms_norm_fp8_triton
from wattserve.kernels.triton_quant_gemv import gemv_fits, quant_gemv_triton
from wattserve.kernels.triton_token_quant import MAX_ONE_PASS, quantize_per_token_fp8_triton
from wattserve.kernels.weight_format import QuantizedWeight

GEMV_MAX_ROWS = 16
DENSE_MIN_ROWS = 512
DEQUANT_BLOCK = (64, 128)  # (BLOCK_N, BLOCK_K) of dequantize_triton
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMV_CONFIG = (16, 32, 256, 4, 4)
GEMM_CONFIG = (64, 64, 64, 4, 3)
# The norm before an fp8 linear (qkv, gate_up) quantizes its rows itself (`fp8_norm_before`),
# saving the token quantizer's launch and the normed rows' write and read: on the H200's
# 4,096-token fp8 prefill of Llama-3.1-8B shapes the norm took 2.07 ms and the quantizer 1.88
# ms (2 of its 3 launches a layer follow a norm) of 71.2 ms
# (benchmarks/results/weight_quant_NVIDIA_H200.json). Off: never run on a GPU yet;
# benchmarks/weight_quant_bench.py times the prefill with it off and on (row fp8+normfp8).
NORM_WRITES_FP8 = False


class Fp8Rows(NamedTuple):
    """Activations already quantized per token for the W8A8 GEMM, which quant_linear_triton
    takes in place of x: codes float8_e4m3fn [M, K], float32 scales [M, 1], and the dtype of
    the rows they stand for (the product's)."""
    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype


@triton.jit
def _scale(codes, s_ptr, o_ptr, cols, k0, N, K, stride_sn,
           HAS_OFFSET: tl.constexpr, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr):
    """codes: [BLOCK_N, WIDTH] float32 codes of the tile's BLOCK_K input columns (WIDTH = BLOCK_K,
    or BLOCK_K / 2 for one nibble of each byte) -> weights. Scales (and offsets) are loaded once
    per group, not per weight, and broadcast over the group's codes."""
    if ONE_GROUP:  # the tile lies inside one group
        s_off = cols * stride_sn + k0 // GROUP
        scale = tl.load(s_ptr + s_off, mask=cols < N, other=0.0).to(tl.float32)
        w = codes * scale[:, None]
        if HAS_OFFSET:
            w += tl.load(o_ptr + s_off, mask=cols < N, other=0.0).to(tl.float32)[:, None]
    else:  # BLOCK_K // GROUP whole groups
        NG: tl.constexpr = BLOCK_K // GROUP
        g = k0 // GROUP + tl.arange(0, NG)
        s_off = cols[:, None] * stride_sn + g[None, :]
        mask = (cols[:, None] < N) & (g[None, :] < K // GROUP)
        scale = tl.load(s_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
        w = tl.reshape(codes, [BLOCK_N, NG, WIDTH // NG]) * scale[:, :, None]
        if HAS_OFFSET:
            w += tl.load(o_ptr + s_off, mask=mask, other=0.0).to(tl.float32)[:, :, None]
        w = tl.reshape(w, [BLOCK_N, WIDTH])
    return w


@triton.jit
def _quant_linear_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, out_ptr, M, N, K,
    stride_xm, stride_cn, stride_sn, stride_om,
    PACKED: tl.constexpr, FP8: tl.constexpr, HAS_OFFSET: tl.constexpr, GROUP: tl.constexpr,
    ONE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows[:, None] < M
    col_mask = cols[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PACKED:
        # Byte j holds columns 2j and 2j+1: multiply the low nibbles by x's even columns and
        # the high nibbles by its odd ones. GROUP is even, so a byte's two codes share a scale.
        HALF: tl.constexpr = BLOCK_K // 2
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // 2 + tl.arange(0, HALF)
            k_mask = kb[None, :] < K // 2
            packed = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_cn + kb[None, :],
                             mask=col_mask & k_mask, other=0)
            w_lo = _scale((packed & 15).to(tl.float32), s_ptr, o_ptr, cols, k0, N, K, stride_sn,
                          HAS_OFFSET, GROUP, ONE_GROUP, BLOCK_N, BLOCK_K, HALF)
            w_hi = _scale((packed >> 4).to(tl.float32), s_ptr, o_ptr, cols, k0, N, K, stride_sn,
                          HAS_OFFSET, GROUP, ONE_GROUP, BLOCK_N, BLOCK_K, HALF)
            x_off = x_ptr + rows[:, None] * stride_xm + 2 * kb[None, :]
            x_even = tl.load(x_off, mask=row_mask & k_mask, other=0.0)
            x_odd = tl.load(x_off + 1, mask=row_mask & k_mask, other=0.0)
            acc = tl.dot(x_even, tl.trans(w_lo.to(x_even.dtype)), acc)
            acc = tl.dot(x_odd, tl.trans(w_hi.to(x_odd.dtype)), acc)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks[None, :] < K
            codes = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_cn + ks[None, :],
                            mask=col_mask & k_mask, other=0)
            if FP8:  # passed as bytes: a masked load's `other` cannot be an fp8 constant
                codes = codes.to(tl.float8e4nv, bitcast=True)
            w = _scale(codes.to(tl.float32), s_ptr, o_ptr, cols, k0, N, K, stride_sn,
                       HAS_OFFSET, GROUP, ONE_GROUP, BLOCK_N, BLOCK_K, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask & k_mask, other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask & (cols[None, :] < N))


def quant_matmul_triton(x: torch.Tensor, w: QuantizedWeight,
                        config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x: [M, K] (float32, bf16 or fp16; columns contiguous) -> [M, N] in x's dtype, weight-only:
    fp8 codes multiply x unquantized. config: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages),
    default by M."""
    if w.perm is not None:
        x = x[:, w.perm]
    x = x.contiguous()
    m, k = x.shape
    assert k == w.in_features
    block_m, block_n, block_k, warps, stages = config or (GEMV_CONFIG if m <= GEMV_MAX_ROWS else GEMM_CONFIG)
    out = torch.empty(m, w.out_features, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    offsets = w.offsets if w.offsets is not None else w.scales
    # A tile spans whole groups or lies inside one: groups are powers of two from 16 to 128,
    # or the whole row.
    one_group = w.group >= block_k or w.group == k
    assert (w.group % block_k == 0 or w.group == k) if one_group else block_k % w.group == 0, (w.group, block_k)
    grid = (triton.cdiv(w.out_features, block_n), triton.cdiv(m, block_m))
    _quant_linear_kernel[grid](
        x, w.codes.view(torch.uint8) if w.kind == "fp8" else w.codes, w.scales, offsets, out, m, w.out_features, k,
        x.stride(0), w.codes.stride(0), w.scales.stride(0), out.stride(0),
        PACKED=w.kind == "u4", FP8=w.kind == "fp8", HAS_OFFSET=w.offsets is not None,
        GROUP=w.group, ONE_GROUP=one_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


@triton.jit
def _dequant_kernel(
    c_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_cn, stride_sn, stride_on,
    PACKED: tl.constexpr, FP8: tl.constexpr, HAS_OFFSET: tl.constexpr, GROUP: tl.constexpr,
    ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows, as in _scale
    k0 = tl.program_id(1) * BLOCK_K
    out_rows = out_ptr + cols[:, None].to(tl.int64) * stride_on
    if PACKED:  # byte j: columns 2j (low nibble) and 2j+1 (high)
        HALF: tl.constexpr = BLOCK_K // 2
        kb = k0 // 2 + tl.arange(0, HALF)
        mask = (cols[:, None] < N) & (kb[None, :] < K // 2)
        packed = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_cn + kb[None, :], mask=mask, other=0)
        w_lo = _scale((packed & 15).to(tl.float32), s_ptr, o_ptr, cols, k0, N, K, stride_sn,
                      HAS_OFFSET, GROUP, ONE_GROUP, BLOCK_N, BLOCK_K, HALF)
        w_hi = _scale((packed >> 4).to(tl.float32), s_ptr, o_ptr, cols, k0, N, K, stride_sn,
                      HAS_OFFSET, GROUP, ONE_GROUP, BLOCK_N, BLOCK_K, HALF)
        tl.store(out_rows + 2 * kb[None, :], w_lo.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_rows + 2 * kb[None, :] + 1, w_hi.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (cols[:, None] < N) & (ks[None, :] < K)
        codes = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_cn + ks[None, :], mask=mask, other=0)
        if FP8:
            codes = codes.to(tl.float8e4nv, bitcast=True)
        w = _scale(codes.to(tl.float32), s_ptr, o_ptr, cols, k0, N, K, stride_sn,
                   HAS_OFFSET, GROUP, ONE_GROUP, BLOCK_N, BLOCK_K, BLOCK_K)
        tl.store(out_rows + ks[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight in `dtype`, its columns in the stored order (GPTQ act-order:
    perm's, so the layer multiplies x[:, perm] by it); reference: weight_format.dequantize."""
    n, k = w.out_features, w.in_features
    block_n, block_k = DEQUANT_BLOCK
    one_group = w.group >= block_k or w.group == k
    assert (w.group % block_k == 0 or w.group == k) if one_group else block_k % w.group == 0, (w.group, block_k)
    out = torch.empty(n, k, device=w.codes.device, dtype=dtype)
    offsets = w.offsets if w.offsets is not None else w.scales
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        w.codes.view(torch.uint8) if w.kind == "fp8" else w.codes, w.scales, offsets, out, n, k,
        w.codes.stride(0), w.scales.stride(0), out.stride(0),
        PACKED=w.kind == "u4", FP8=w.kind == "fp8", HAS_OFFSET=w.offsets is not None,
        GROUP=w.group, ONE_GROUP=one_group, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def quant_linear_triton(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The CUDA path: one or two rows (batch-1 decode) on the CUDA cores
    (kernels/triton_quant_gemv.py), fp8 beyond decode sizes W8A8 on the fp8 tensor cores, other
    formats from DENSE_MIN_ROWS rows dequantized once and multiplied by cuBLAS, everything else
    the dequantize-in-the-loop kernel. The choice uses x's shape only, so it is fixed inside a
    captured graph. x may be Fp8Rows (from `fp8_norm_before`, only where W8A8 runs)."""
    if isinstance(x, Fp8Rows):
        return _scaled_mm_of_codes(x.codes, x.scales, w, x.dtype)
    if gemv_fits(x, w):
        return quant_gemv_triton(x, w)
    if _runs_w8a8(x, w):
        return fp8_scaled_mm(x, w)
    if x.shape[0] >= DENSE_MIN_ROWS:
        stored_order = x if w.perm is None else x[:, w.perm]
        return torch.nn.functional.linear(stored_order, dequantize_triton(w, x.dtype))
    return quant_matmul_triton(x, w)


def fp8_scaled_mm(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """W8A8: x quantized per token, the product scaled by x's and w's scales in the epilogue.
    x: [M, K] -> [M, N] in x's dtype."""
    return _scaled_mm_of_codes(*quantize_per_token_fp8_triton(x), w, x.dtype)


def fp8_gated_linear(gate_up: torch.Tensor, w, gelu_tanh: bool) -> torch.Tensor | None:
    """Ops.gated_linear's fused W8A8 path (kernels/activation.gated_linear_with): act(gate) *
    up quantized per token as the activation kernel writes it, then the fp8 GEMM. None where
    it does not apply: other formats, decode sizes, intermediate sizes past MAX_ONE_PASS."""
    if not (isinstance(w, QuantizedWeight) and w.kind == "fp8" and gate_up.shape[0] > GEMV_MAX_ROWS
            and gate_up.shape[1] // 2 <= MAX_ONE_PASS and _scaled_mm_fits(gate_up, w)):
        return None
    return _scaled_mm_of_codes(*act_and_mul_fp8_triton(gate_up, gelu_tanh), w, gate_up.dtype)


def fp8_norm_before(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    next_weight) -> tuple[Fp8Rows, torch.Tensor] | None:
    """Ops.norm_before's fused W8A8 path (kernels/norm.norm_before_with): the normed rows
    quantized per token in the norm's kernel, as Fp8Rows for quant_linear_triton, and the
    residual stream. None where it does not apply: NORM_WRITES_FP8 off, a next weight other
    than one fp8 QuantizedWeight, rows that quant_linear_triton would not send to the W8A8 GEMM
    (decode sizes), rows past MAX_ONE_PASS, a norm weight of another dtype than x."""
    if not (NORM_WRITES_FP8 and isinstance(next_weight, QuantizedWeight) and _runs_w8a8(x, next_weight)
            and x.shape[1] <= MAX_ONE_PASS and weight.dtype == x.dtype):
        return None
    codes, scales = rms_norm_fp8_triton(x, weight, eps, residual)
    return Fp8Rows(codes, scales, x.dtype), x if residual is None else residual


def _runs_w8a8(x: torch.Tensor, w: QuantizedWeight) -> bool:
    """Whether quant_linear_triton multiplies x by w on the fp8 tensor cores: fp8 rows beyond
    decode sizes (the GEMV's MAX_ROWS is below GEMV_MAX_ROWS), where _scaled_mm takes them."""
    return w.kind == "fp8" and x.shape[0] > GEMV_MAX_ROWS and _scaled_mm_fits(x, w)


def _scaled_mm_of_codes(codes: torch.Tensor, x_scales: torch.Tensor, w: QuantizedWeight,
                        dtype: torch.dtype) -> torch.Tensor:
    # _scaled_mm wants the second operand column-major: the [N, K] row-major codes transposed.
    # Row-wise scales: a [M, 1] and a [1, N] float32 (a view of the contiguous [N, 1]).
    return torch._scaled_mm(codes, w.codes.t(), scale_a=x_scales, scale_b=w.scales.view(1, -1), out_dtype=dtype)


def _scaled_mm_fits(x: torch.Tensor, w: QuantizedWeight) -> bool:
    """fp8 tensor cores (sm_89+), bf16 output (row-wise scaling's only one), and the
    dimensions in multiples of 16 that cuBLASLt's fp8 GEMM needs."""
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 9) \
        and w.in_features % 16 == 0 and w.out_features % 16 == 0
