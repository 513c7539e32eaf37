"""Triton gated activations: silu(gate) * up and gelu_tanh(gate) * up. References:
activation.silu_and_mul_ref, activation.gelu_tanh_and_mul_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs
from wattserve.kernels.triton_kv_write import native_fp8
from wattserve.kernels.triton_token_quant import MAX_ONE_PASS, empty_fp8_rows, quantize_row, row_warps
from wattserve.kernels.weight_format import FP8_MAX


@triton.jit
def _act_times_up(g, u, GELU_TANH: tl.constexpr):
    """act(g) * u in g's dtype, rounded as the reference's two ops round."""
    gf = g.to(tl.float32)
    if GELU_TANH:  # 0.5 x (1 + tanh(y)) = x * sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3)
        y = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        act = gf / (1.0 + tl.exp(-2.0 * y))
    else:
        act = gf / (1.0 + tl.exp(-gf))
    # Rounded to the input dtype between the activation and the multiply, as the reference's
    # two ops do.
    act = act.to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _act_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, inter, BLOCK: tl.constexpr,
                        GELU_TANH: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, _act_times_up(g, u, GELU_TANH), mask=mask)


@triton.jit
def _act_and_mul_fp8_kernel(gu_ptr, codes_ptr, scales_ptr, stride_gu, stride_codes, inter, BLOCK: tl.constexpr,
                            GELU_TANH: tl.constexpr, FP8_MAX: tl.constexpr, NATIVE_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    codes, scale = quantize_row(_act_times_up(g, u, GELU_TANH).to(tl.float32), FP8_MAX, NATIVE_FP8)
    tl.store(codes_ptr + row * stride_codes + cols, codes, mask=mask)
    tl.store(scales_ptr + row, scale)


def silu_and_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (last dim contiguous) -> [num_tokens, intermediate]."""
    return _act_and_mul(gate_up, block, gelu_tanh=False)


def gelu_tanh_and_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (last dim contiguous) -> [num_tokens, intermediate]."""
    return _act_and_mul(gate_up, block, gelu_tanh=True)


def act_and_mul_fp8_triton(gate_up: torch.Tensor, gelu_tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) * up quantized per token for the W8A8 GEMM in the same pass: the codes and
    scales of `quantize_per_token_fp8_triton(silu_and_mul_triton(gate_up))` (or gelu's),
    without the activation's round trip through memory (the bf16 product written, then read
    back to quantize). gate_up: [num_tokens, 2 * intermediate], intermediate <= MAX_ONE_PASS
    -> (float8_e4m3fn [num_tokens, intermediate], float32 scales [num_tokens, 1])."""
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(-1) == 1 and inter <= MAX_ONE_PASS
    codes, scales = empty_fp8_rows(num_tokens, inter, gate_up.device)
    if num_tokens:
        block = triton.next_power_of_2(inter)
        _act_and_mul_fp8_kernel[(num_tokens,)](
            gate_up, codes, scales, gate_up.stride(0), codes.stride(0), inter, BLOCK=block, GELU_TANH=gelu_tanh,
            FP8_MAX=FP8_MAX, NATIVE_FP8=native_fp8(gate_up.device),
            num_warps=row_warps(block),  # the whole row in registers
        )
    return codes.view(torch.float8_e4m3fn), scales


def _act_and_mul(gate_up: torch.Tensor, block: int, gelu_tanh: bool) -> torch.Tensor:
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(-1) == 1
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        # 1024 columns over 4 warps: 8 bf16 (16 bytes) per thread and load.
        _act_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, GELU_TANH=gelu_tanh,
            PDL=pdl_enabled(gate_up.device), num_warps=4, launch_pdl=pdl_enabled(gate_up.device),
        )
    return out
