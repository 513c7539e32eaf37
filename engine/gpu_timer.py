"""How long the GPU worked on a step's forward pass, from CUDA events.

Set beside the step's wall time, it shows the share of a step the GPU sits idle while the
host schedules, prepares inputs, samples and hands out outputs. Events cost microseconds and
never synchronize on their own: a span is read once its step's tokens have reached the host.
Each forward pass gets its own span, because with steps launched ahead (engine/core.py) the
next one starts before the last one is read.
"""
from __future__ import annotations

import torch


class GpuSpan:
    """CUDA events around one forward pass (inputs copied in, logits out)."""

    def __init__(self):
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._start.record()

    def stop(self) -> None:
        self._end.record()

    def seconds(self) -> float:
        self._end.synchronize()  # already passed once the step's tokens are on the host
        return self._start.elapsed_time(self._end) / 1e3


class GpuBusyTimer:
    """Spans on CUDA; on other devices nothing is recorded and `start()` gives None."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"

    def start(self) -> GpuSpan | None:
        return GpuSpan() if self.enabled else None
