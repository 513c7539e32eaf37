"""Keep the engine's average power under a cap by doing less work per unit of time.

The GPU's own clocks and power limit are never touched (no nvidia-smi -pl): a capped server
must not change what other tenants of the GPU get, and needs no privileges. Instead one
throttle level, 0..1, drives two levers in turn:

- 0 to 0.5 shrinks the scheduler's token budget per step from max_num_batched_tokens down to
  max_num_seqs. This flattens the compute-bound prefill bursts that draw the most power,
  while every running sequence still decodes each step (a smaller budget would starve the
  newest running sequences instead).
- 0.5 to 1 idles the engine before each step for a growing fraction of the time, up to 90%.
  Decode is memory-bound, and a smaller batch draws nearly the same power per step, so for
  decode only doing fewer steps per second brings the average down.

The level is an integral controller on the relative error of the sampler's moving-average
power: it settles where the average equals the cap (no steady offset, unlike AIMD's saw
tooth). Its gain (0.5 per second per unit of relative error) keeps the loop well damped
against the lag of a one-second averaging window.
"""
from __future__ import annotations

from typing import Callable

from wattserve.engine.stats import StatsObserver, StepStats

MAX_IDLE = 0.9


class PowerCapController(StatsObserver):
    def __init__(self, core, average_power_w: Callable[[], float | None], cap_w: float,
                 period_s: float = 0.2, gain_per_s: float = 0.5):
        """`core`: the EngineCore whose scheduler.token_budget and step_pause_s this sets;
        `average_power_w`: the moving-average power of the engine's devices."""
        self.core = core
        self.cap_w = cap_w
        self._power = average_power_w
        self._period_s = period_s
        self._gain = gain_per_s
        config = core.scheduler.config
        self.max_budget = config.max_num_batched_tokens
        self.min_budget = min(config.max_num_seqs, self.max_budget)
        self.throttle = 0.0
        self._last_update: float | None = None

    def on_step(self, step: StepStats) -> None:
        if self._last_update is None:
            self._last_update = step.end
        elif step.end - self._last_update >= self._period_s:
            power = self._power()
            if power is not None:
                error = (power - self.cap_w) / self.cap_w
                self.throttle += self._gain * (step.end - self._last_update) * error
                self.throttle = min(1.0, max(0.0, self.throttle))
            self._last_update = step.end
        shrink = min(1.0, 2 * self.throttle)
        self.core.scheduler.token_budget = round(
            self.max_budget - (self.max_budget - self.min_budget) * shrink)
        idle = max(0.0, 2 * self.throttle - 1) * MAX_IDLE
        # Idle time in proportion to the work time keeps the idle fraction whatever a step costs.
        self.core.step_pause_s = idle / (1 - idle) * (step.end - step.start)
