"""Host lists to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which synchronizes the
stream: the host would wait for the step already running on the GPU before it could launch
the next one (engine/core.py launches ahead). Staging through pinned memory makes the copy
asynchronous; PyTorch's pinned allocator keeps each staging buffer until its copy is done.
"""
from __future__ import annotations

import torch


def device_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
