"""Power and energy of the devices the engine runs on, sampled by a background thread.

A PowerSource reads devices (engine/power_sources.py: NVML, RAPL; tests inject fakes); the
PowerSampler reads it every interval and publishes an immutable PowerSnapshot, replaced
whole, so the engine thread and the metrics scrape read it without a lock. Energy comes from
a device's cumulative counter where it has one (NVML on Volta and later, RAPL), else from
integrating the sampled power (trapezoids).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger("wattserve.power")


@dataclass(frozen=True)
class PowerReading:
    """One device at one instant; None where the device does not report a quantity."""

    device: str
    energy_j: float | None = None  # a cumulative counter, from any origin
    power_w: float | None = None
    temperature_c: float | None = None
    sm_clock_hz: float | None = None
    utilization: float | None = None  # 0..1


class PowerSource(Protocol):
    name: str

    def read(self) -> list[PowerReading]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceSample:
    device: str
    power_w: float
    energy_j: float  # since the sampler started
    temperature_c: float | None
    sm_clock_hz: float | None
    utilization: float | None


@dataclass(frozen=True)
class PowerSnapshot:
    time: float
    devices: tuple[DeviceSample, ...]
    power_w: float  # all devices together
    energy_j: float
    average_power_w: float  # over the sampler's averaging window

    def energy_at(self, t: float) -> float:
        """Energy since the sampler started, extrapolated from this sample to time `t`."""
        return self.energy_j + self.power_w * (t - self.time)


class PowerSampler:
    def __init__(self, source: PowerSource, interval_s: float = 0.1, average_window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.source = source
        self.interval_s = interval_s
        self.average_window_s = average_window_s
        self._clock = clock
        self.snapshot: PowerSnapshot | None = None
        self._origin: dict[str, float] = {}  # each counter's first value
        # (time, total energy) of recent samples; touched by the sampler thread only.
        self._history: deque[tuple[float, float]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> PowerSnapshot:
        now = self._clock()
        before = self.snapshot
        previous = {d.device: d for d in before.devices} if before else {}
        dt = now - before.time if before else 0.0
        devices = tuple(self._advance(r, previous.get(r.device), dt) for r in self.source.read())
        power = sum(d.power_w for d in devices)
        energy = sum(d.energy_j for d in devices)
        self._history.append((now, energy))
        # Keep one sample at least a window old, so the average spans the whole window.
        while len(self._history) > 2 and self._history[1][0] <= now - self.average_window_s:
            self._history.popleft()
        t0, e0 = self._history[0]
        average = (energy - e0) / (now - t0) if now > t0 else power
        self.snapshot = PowerSnapshot(now, devices, power, energy, average)
        return self.snapshot

    def _advance(self, r: PowerReading, prev: DeviceSample | None, dt: float) -> DeviceSample:
        if r.energy_j is not None:
            energy = r.energy_j - self._origin.setdefault(r.device, r.energy_j)
            derived = (energy - prev.energy_j) / dt if prev and dt > 0 else 0.0
            # A device's own power reading is smoother than counter deltas over one interval.
            power = r.power_w if r.power_w is not None else derived
        else:
            power = r.power_w or 0.0
            energy = prev.energy_j + (prev.power_w + power) / 2 * dt if prev else 0.0
        return DeviceSample(r.device, power, energy, r.temperature_c, r.sm_clock_hz, r.utilization)

    # ---- background thread ---------------------------------------------------------------
    def start(self) -> None:
        self.sample()  # a snapshot exists before the first engine step asks for one
        self._thread = threading.Thread(target=self._run, name="wattserve-power", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
                failing = False
            except Exception:
                if not failing:  # a failing device must not flood the log every 100 ms
                    log.exception("reading power from %s failed; retrying", self.source.name)
                failing = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.source.close()
