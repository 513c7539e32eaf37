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
def _per_token_fp8_kernel(x_ptr, codes_ptr, scales_ptr, K, stride_xm, stride_cm,
                          FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          NATIVE_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    codes_row = codes_ptr + row * stride_cm
    if ONE_PASS:  # the row in registers: x read once
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, 1e-12)
        tl.store(codes_row + cols, _quantize_codes(x, scale, FP8_MAX, NATIVE_FP8), mask=cols < K)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, 1e-12)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(codes_row + k0 + cols, _quantize_codes(x, scale, FP8_MAX, NATIVE_FP8), mask=mask)
    tl.store(scales_ptr + row, scale)


def quantize_per_token_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (columns contiguous) -> (float8_e4m3fn [M, K], float32 scales [M, 1])."""
    m, k = x.shape
    assert x.stride(-1) == 1
    codes = torch.empty(m, k, device=x.device, dtype=torch.uint8)  # fp8 bit patterns
    scales = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        one_pass = k <= MAX_ONE_PASS
        block = triton.next_power_of_2(k) if one_pass else LOOP_BLOCK
        _per_token_fp8_kernel[(m,)](x, codes, scales, k, x.stride(0), codes.stride(0), FP8_MAX=FP8_MAX,
                                    BLOCK=block, ONE_PASS=one_pass, NATIVE_FP8=native_fp8(x.device),
                                    num_warps=min(max(block // 512, 4), 16))  # <= 32 values a thread
    return codes.view(torch.float8_e4m3fn), scales
