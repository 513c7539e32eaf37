"""Triton gated activations: silu(gate) * up and gelu_tanh(gate) * up. References:
activation.silu_and_mul_ref, activation.gelu_tanh_and_mul_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs


@triton.jit
def _act_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, inter, BLOCK: tl.constexpr,
                        GELU_TANH: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    if GELU_TANH:  # 0.5 x (1 + tanh(y)) = x * sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3)
        y = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        act = gf / (1.0 + tl.exp(-2.0 * y))
    else:
        act = gf / (1.0 + tl.exp(-gf))
    # Rounded to the input dtype between the activation and the multiply, as the reference's
    # two ops do.
    act = act.to(g.dtype)
    tl.store(out_ptr + row * stride_out + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (last dim contiguous) -> [num_tokens, intermediate]."""
    return _act_and_mul(gate_up, block, gelu_tanh=False)


def gelu_tanh_and_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (last dim contiguous) -> [num_tokens, intermediate]."""
    return _act_and_mul(gate_up, block, gelu_tanh=True)


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
