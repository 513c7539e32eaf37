"""Power readings, the energy meter and the power cap, attached to an EngineCore in the
process that steps it: the cap acts on each step (token budget, pause) and the meter prices
each step, so both live beside the scheduler rather than one message away from it."""
from __future__ import annotations

from wattserve.engine.client import EngineInfo, EngineSnapshot, PowerCapState
from wattserve.engine.config import MonitorConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.energy import EnergyMeter
from wattserve.engine.power import PowerSampler, PowerSource
from wattserve.engine.power_cap import PowerCapController


class CoreMonitor:
    def __init__(self, core: EngineCore, config: MonitorConfig, power_source: PowerSource | None):
        """`power_source`: the core's devices (engine/power_sources.py); None: no power
        metrics, and a power cap is refused."""
        self.core = core
        self.power = None if power_source is None else PowerSampler(
            power_source, config.power_sample_interval_ms / 1e3)
        self.cap: PowerCapController | None = None
        if self.power is None:
            if config.power_cap_watts is not None:
                raise ValueError("--power-cap-watts needs power readings, and there are none "
                                 "here (the log says why)")
            return
        core.energy_meter = EnergyMeter(self.power)
        if config.power_cap_watts is not None:
            power = self.power
            self.cap = PowerCapController(core, lambda: power.snapshot.average_power_w,
                                          config.power_cap_watts)
            core.observers.append(self.cap)

    def start(self) -> None:
        if self.power is not None:
            self.power.start()  # before the first step, which reads a sample

    def stop(self) -> None:
        if self.power is not None:
            self.power.stop()

    def info(self) -> EngineInfo:
        core = self.core
        return EngineInfo(
            model_name=core.model_name, model_path=core.model_path,
            dtype=str(core.dtype).removeprefix("torch."), device=str(core.device),
            max_model_len=core.max_model_len, vocab_size=core.model_config.vocab_size,
            gpu_timed=core.runner.gpu_timer.enabled,
            power_average_window_s=None if self.power is None else self.power.average_window_s,
            power_cap_w=None if self.cap is None else self.cap.cap_w)

    def snapshot(self) -> EngineSnapshot:
        cap = None if self.cap is None else PowerCapState(self.cap.throttle,
                                                          self.core.scheduler.token_budget)
        return EngineSnapshot(self.core.stats(), None if self.power is None else self.power.snapshot,
                              cap)
