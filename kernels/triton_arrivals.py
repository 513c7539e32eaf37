"""Arrival counters for kernels whose last program to finish an output tile adds the other
programs' partials in a fixed order: one launch instead of a kernel and its reduction, and
the same sum whatever order the programs ran in (no float atomics). Used by the split-K
decode GEMV (kernels/triton_gemv.py), the MoE's down projection (kernels/triton_moe.py) and
the fused router (kernels/triton_moe_routing.py).

In the kernel: store the partial, then `if last_to_arrive(counter, arrivals):` load the
partials (`cache_modifier=".cg"`: from L2, not a stale L1) and write the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One zeroed int32 buffer per (device, count), kept for the process's life: allocated on
# first use (the decode graphs' warm-up runs before their capture), so a captured graph keeps
# reading the same counters. Launches on one stream run in turn and leave their counters at
# 0, so every call site of a size shares one buffer.
_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """[count] int32 zeros, shared by the launches that need `count` counters on `device`."""
    key = (torch.device(device), count)
    if key not in _counters:
        _counters[key] = torch.zeros(count, dtype=torch.int32, device=device)
    return _counters[key]


@triton.jit
def last_to_arrive(counter, arrivals):
    """Whether this program is the last of `arrivals` to reach `counter`; the last sets it
    back to 0 for the next launch."""
    tl.debug_barrier()  # every thread's partial is written before the release below
    last = tl.atomic_add(counter, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(counter, 0)
    return last
