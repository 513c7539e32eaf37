"""The one place that picks an implementation of each op for a device.

The model calls `ops.<name>`; on CPU every op is the PyTorch reference. The Triton kernels
(CUDA) plug in here, so no model code branches on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.activation import silu_and_mul_ref
from kernels.attention import paged_attention_ref
from kernels.kv_write import write_kv_ref
from kernels.norm import add_rms_norm_ref, rms_norm_ref
from kernels.rotary import apply_rotary_ref


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rotary: Callable
    write_kv: Callable
    paged_attention: Callable
    silu_and_mul: Callable


REFERENCE_OPS = Ops(
    rms_norm=rms_norm_ref,
    add_rms_norm=add_rms_norm_ref,
    apply_rotary=apply_rotary_ref,
    write_kv=write_kv_ref,
    paged_attention=paged_attention_ref,
    silu_and_mul=silu_and_mul_ref,
)


def ops_for(device: torch.device) -> Ops:
    # The Triton kernels (CUDA) are not wired in yet; the references run everywhere.
    return REFERENCE_OPS
