"""Triton per-token fp8 quantization of activations, the W8A8 prefill's input.
Reference: kernels/weight_format.py `quantize_per_token_fp8` (the same codes and scales).

In PyTorch it is six elementwise passes over x (float, abs, amax, divide, clamp, convert),
about 30 bytes of memory traffic per activation, the work W8A8 adds to a prefill; fp8 weights
prefilled slower than bf16 ones on the H200 (benchmarks/results/weight_quant_NVIDIA_H200.json).
Here one program per row reads x once (rows up to MAX_ONE_PASS columns stay in registers;
longer ones are read twice, the second time from L2) and writes one byte per activation. The
H200's 4,096-token fp8 prefill of Llama-3.1-8B shapes spent 4.8 ms of 73 ms here when every
row took two passes (benchmarks/results/weight_quant_NVIDIA_H200.json, prefill_kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.triton_kv_write import fp8_codes, native_fp8
from wattserve.kernels.weight_format import FP8_MAX

MAX_ONE_PASS = 16384  # a row this long stays in registers (32 values a thread at 16 warps)
LOOP_BLOCK = 1024  # longer rows: two passes of this many columns, the second from L2


@triton.jit
def _quantize_codes(x, scale, FP8_MAX: tl.constexpr, NATIVE_FP8: tl.constexpr):
    # IEEE division and clamp, as the reference computes them, so the codes are its own
    # (rounded by the KV write's fp8 conversion: the GPU's, or bits where it has none).
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    codes, _ = fp8_codes(q, NATIVE_FP8)
    return codes


@triton.jit
def _scale(magnitudes, FP8_MAX: tl.constexpr):
    """A row's scale from magnitudes whose largest is the row's. IEEE division, as the
    reference's: Triton's '/' (div.full.f32) by the constant compiled to a multiply by
    RN(1/448), which differs from RN(amax/448) for 71 of bf16's 128 significands."""
    return tl.maximum(tl.math.div_rn(tl.max(magnitudes, 0), FP8_MAX), 1e-12)


@triton.jit
def quotient_by_reciprocal(x, scale, reciprocal):
    """RN(x / scale), bit for bit, for the values and scales of bf16 rows, from reciprocal =
    RN(1 / scale): the product, its residual by one FMA and the correction by another
    (Markstein's sequence; tests/test_act_fp8_pipelined.py checks every bf16 significand
    pair over the binades that reach an fp8 code against IEEE division). div_rn executes a
    reciprocal, its refinement, a range check and a branch on every value (10 sm_90
    instructions, and a slow-path call stub beside them); this, 4 (FMUL, 2 FFMA, a LOP3 for
    the sign). Needs a real FMA: the interpreter's rounds twice, so it runs div_rn instead."""
    q = x * reciprocal
    q = tl.fma(tl.fma(-scale, q, x), reciprocal, q)
    # x = -0: the residual's +0 turns q into +0, where x / scale (scale > 0) keeps x's sign.
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    return (q.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quantize_row(x, FP8_MAX: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """A whole row x (float32, padding 0) -> (its fp8 codes as bytes, its float32 scale),
    as weight_format.quantize_per_token_fp8 computes them."""
    scale = row_scale(x, FP8_MAX)
    return _quantize_codes(x, scale, FP8_MAX, NATIVE_FP8), scale


@triton.jit
def row_scale(x, FP8_MAX: tl.constexpr):
    """A whole row x's (float32, padding 0) scale, as quantize_row's."""
    return _scale(tl.abs(x), FP8_MAX)


@triton.jit
def _per_token_fp8_kernel(x_ptr, codes_ptr, scales_ptr, K, stride_xm, stride_cm,
                          FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          NATIVE_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    codes_row = codes_ptr + row * stride_cm
    if ONE_PASS:  # the row in registers: x read once
        codes, scale = quantize_row(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32), FP8_MAX, NATIVE_FP8)
        tl.store(codes_row + cols, codes, mask=cols < K)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _scale(amax, FP8_MAX)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(codes_row + k0 + cols, _quantize_codes(x, scale, FP8_MAX, NATIVE_FP8), mask=mask)
    tl.store(scales_ptr + row, scale)


def empty_fp8_rows(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for a per-token fp8 kernel to fill: (codes [m, k] as bytes, the fp8 bit patterns
    a kernel stores; float32 scales [m, 1])."""
    return (torch.empty(m, k, device=device, dtype=torch.uint8),
            torch.empty(m, 1, device=device, dtype=torch.float32))


def row_warps(block: int) -> int:
    """Warps for a program holding a row of `block` values in registers: at most 32 a thread."""
    return min(max(block // 512, 4), 16)


def quantize_per_token_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (columns contiguous) -> (float8_e4m3fn [M, K], float32 scales [M, 1])."""
    m, k = x.shape
    assert x.stride(-1) == 1
    codes, scales = empty_fp8_rows(m, k, x.device)
    if m:
        one_pass = k <= MAX_ONE_PASS
        block = triton.next_power_of_2(k) if one_pass else LOOP_BLOCK
        _per_token_fp8_kernel[(m,)](x, codes, scales, k, x.stride(0), codes.stride(0), FP8_MAX=FP8_MAX,
                                    BLOCK=block, ONE_PASS=one_pass, NATIVE_FP8=native_fp8(x.device),
                                    num_warps=row_warps(block))
    return codes.view(torch.float8_e4m3fn), scales
