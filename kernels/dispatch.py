"""The one place that picks an implementation of each op for a device.

The model calls `ops.<name>`; on CPU every op is the PyTorch reference, on CUDA the Triton
kernel (kernels/triton_*.py), so no model code branches on the device. Matmuls are cuBLAS
on CUDA except decode-sized ones (kernels/triton_gemv.py). `linear` also takes quantized
weights (kernels/weight_format.py) and picks their kernel, so the model never branches on a
weight's format either; `norm_before` is told the weight its rows go to, so that an fp8 one
can take them already quantized. Setting WATTSERVE_OPS=reference runs the references on CUDA
too, for A/B checks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from wattserve.kernels.activation import gated_linear_with, gelu_tanh_and_mul_ref, silu_and_mul_ref
from wattserve.kernels.attention import paged_attention_ref
from wattserve.kernels.kv_rotation import in_model_basis
from wattserve.kernels.moe import fused_moe_ref, route_ref
from wattserve.kernels.norm import add_rms_norm_ref, norm_before_with, rms_norm_ref
from wattserve.kernels.quant_linear import for_any_weight, linear_ref
from wattserve.kernels.rotary import rotary_write_kv_ref


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    add_rms_norm: Callable
    norm_before: Callable
    rotary_write_kv: Callable
    paged_attention: Callable
    linear: Callable
    gated_linear: Callable
    route: Callable
    fused_moe: Callable


REFERENCE_OPS = Ops(
    rms_norm=rms_norm_ref,
    add_rms_norm=add_rms_norm_ref,
    norm_before=norm_before_with(rms_norm_ref, add_rms_norm_ref),
    rotary_write_kv=rotary_write_kv_ref,
    paged_attention=in_model_basis(paged_attention_ref),
    linear=linear_ref,
    gated_linear=gated_linear_with(silu_and_mul_ref, gelu_tanh_and_mul_ref, linear_ref),
    route=route_ref,
    fused_moe=fused_moe_ref,
)


def keeps_weights_quantized(device: torch.device) -> bool:
    """Whether quantized checkpoints run quantized on `device`. On CPU the reference
    dequantizes every weight at every step: SmolLM2-135M Q4_1 greedy-decoded 30 tokens in
    266 s kept quantized against 26 s dequantized once at load (2 shared cores, same run
    conditions), so CPU dequantizes at load."""
    return torch.device(device).type == "cuda"


def ops_for(device: torch.device) -> Ops:
    if torch.device(device).type != "cuda" or os.environ.get("WATTSERVE_OPS") == "reference":
        return REFERENCE_OPS
    return triton_ops()


def triton_ops() -> Ops:
    # Imported here: CPU-only installs have no triton.
    from wattserve.kernels.triton_activation import gelu_tanh_and_mul_triton, silu_and_mul_triton
    from wattserve.kernels.triton_attention import paged_attention_triton
    from wattserve.kernels.triton_gemv import linear_triton
    from wattserve.kernels.triton_moe import fused_moe_triton
    from wattserve.kernels.triton_moe_routing import fuses_routing, route_triton, select_experts_triton
    from wattserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
    from wattserve.kernels.triton_quant_linear import fp8_gated_linear, fp8_norm_before, quant_linear_triton
    from wattserve.kernels.triton_rotary import rotary_write_kv_triton

    linear = for_any_weight(linear_triton, quant_linear_triton)

    def route(x: torch.Tensor, router_weight, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Decode sizes: the router's matmul and its top-k in one launch.
        if fuses_routing(x, router_weight):
            return route_triton(x, router_weight, top_k, renormalize)
        return select_experts_triton(linear(x, router_weight), top_k, renormalize)

    return Ops(
        rms_norm=rms_norm_triton,
        add_rms_norm=add_rms_norm_triton,
        norm_before=norm_before_with(rms_norm_triton, add_rms_norm_triton, fp8_norm_before),
        rotary_write_kv=rotary_write_kv_triton,
        paged_attention=in_model_basis(paged_attention_triton),
        linear=linear,
        gated_linear=gated_linear_with(silu_and_mul_triton, gelu_tanh_and_mul_triton, linear, fp8_gated_linear),
        route=route,
        fused_moe=fused_moe_triton,
    )
