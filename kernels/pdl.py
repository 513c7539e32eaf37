"""Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode step.

A batch-1 decode step is hundreds of short kernels in a row (benchmarks/results/
moe_NVIDIA_H200.json, decode_kernels: 1.5-4 us each), and between two of them the SMs idle:
the next grid is launched only once the previous one has finished and flushed, and its
programs then start from nothing. With PDL a kernel's grid is launched while its predecessor
still runs: its programs are resident and waiting when the predecessor's last program ends,
and a matrix kernel has already asked L2 for its first weight tiles, which no earlier kernel
writes.

The contract every kernel launched with `launch_pdl` keeps: it calls `wait_for_inputs`
before it reads anything an earlier kernel wrote and before it writes anything. Only reads
of constant data (weights) may come before. `griddepcontrol.wait` returns once the
predecessor grid has completed and its writes are visible, and since the predecessor kept
the same contract, every earlier kernel has completed too. A kernel launched without the
attribute (cuBLAS, a PyTorch op) is ordered as always.

Off on CPU, under Triton's interpreter, before sm_90, and with WATTSERVE_PDL=0 (an A/B switch
for benchmarks).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (pass it as both the kernel's PDL constexpr
    and its `launch_pdl` launch option)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("WATTSERVE_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device) >= (9, 0))


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Lets the next kernel's grid launch, then waits for the previous one (module doc)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def prefetch_rows_l2(row_ptrs, row_len, BYTES: tl.constexpr, PDL: tl.constexpr):
    """Asks L2 for the first BYTES bytes (a power of two) of each row while the kernel waits for
    its inputs; nothing is loaded into registers. row_ptrs: [R] pointers to each row's first
    element; row_len: elements in a row (requests stay inside it)."""
    if PDL:
        ELEMS_PER_LINE: tl.constexpr = 1024 // row_ptrs.dtype.element_ty.primitive_bitwidth  # 128-byte lines
        LINES: tl.constexpr = (BYTES + 127) // 128
        offsets = tl.minimum(tl.arange(0, LINES) * ELEMS_PER_LINE, row_len - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [row_ptrs[:, None] + offsets[None, :]],
                                  dtype=tl.int32, is_pure=False, pack=1)
