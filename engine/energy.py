"""The energy of each engine step, read off a PowerSampler.

The sampler reads the devices every interval (100 ms) while a decode step takes
milliseconds, so a step's energy is read off an extrapolation: the last sample's energy plus
its power times the time since. When the next sample lands the extrapolation has over- or
undershot; the cursor carries the difference into the following steps (energy is handed out
once and never negative), so over a busy period the steps together account for the devices'
energy to within one sample's error. Energy drawn while the engine idles (a gap between
steps longer than a sample interval) belongs to no step.

How a step's energy is split among requests is the engine's rule (EngineCore._record_step):
in proportion to the tokens each processed in the step, prompt and generated alike, as
Splitwise and DistServe account prefill and decode work. Joules per output token is then
the total over output tokens, so prefill energy is priced into the tokens it enabled.
"""
from __future__ import annotations

from wattserve.engine.power import PowerSampler


class EnergyMeter:
    def __init__(self, sampler: PowerSampler):
        self._sampler = sampler
        self._cursor = float("-inf")  # energy (sampler's origin) already handed out or idle
        self._last_end = float("-inf")

    def step_energy(self, start: float, end: float) -> float:
        """Joules the devices drew from `start` to `end` (time.monotonic seconds)."""
        snap = self._sampler.snapshot
        if snap is None:
            return 0.0
        gap = start - self._last_end
        if gap > self._sampler.interval_s:
            self._cursor = max(self._cursor, snap.energy_at(start))
        else:
            # Back to back: only the gap itself is idle, and an extrapolation that fell short
            # during the previous steps is still owed, to this one.
            self._cursor += snap.power_w * gap
        reached = snap.energy_at(end)
        energy = max(0.0, reached - self._cursor)
        self._cursor = max(self._cursor, reached)
        self._last_end = end
        return energy
