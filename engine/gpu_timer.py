"""How long the GPU worked on a step's forward pass, from CUDA events.

Set beside the step's wall time, it shows the share of a step the GPU sits idle while the
host schedules, prepares inputs, samples and hands out outputs. Events cost microseconds and
never synchronize on their own: the step has already waited for its sampled tokens when the
time is read.
"""
from __future__ import annotations

import torch


class GpuBusyTimer:
    """CUDA events around the forward pass (inputs copied in, logits out); on other devices
    it records nothing and `take()` gives None."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        if self.enabled:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._pending = False

    def start(self) -> None:
        if self.enabled:
            self._start.record()

    def stop(self) -> None:
        if self.enabled:
            self._end.record()
            self._pending = True

    def take(self) -> float | None:
        """Seconds between the last start() and stop() on the GPU's clock, once; None when
        nothing was timed since the last take()."""
        if not self._pending:
            return None
        self._pending = False
        self._end.synchronize()  # already passed once the sampler has read its tokens
        return self._start.elapsed_time(self._end) / 1e3
