"""Power sources, the sampler, step energy, its attribution to requests, and the power cap,
all with deterministic power sources and clocks (no GPU, no RAPL needed)."""
import logging
import time
from types import SimpleNamespace

import pytest
import torch

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.energy import EnergyMeter
from wattserve.engine.power import PowerReading, PowerSampler
from wattserve.engine.power_cap import MAX_IDLE, PowerCapController
from wattserve.engine.power_sources import NvmlPowerSource, RaplPowerSource, open_power_source
from wattserve.engine.request import SamplingParams
from wattserve.engine.stats import StatsObserver, StepStats


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class ScriptedSource:
    """Returns the readings `script(t)` gives for the clock's time."""

    name = "fake"

    def __init__(self, clock: Clock, script):
        self.clock, self.script = clock, script
        self.closed = False

    def read(self) -> list[PowerReading]:
        return self.script(self.clock.t)

    def close(self) -> None:
        self.closed = True


def constant(watts: float):
    return lambda t: [PowerReading("fake0", power_w=watts)]


# ---- sources -----------------------------------------------------------------------------
def rapl_tree(root, packages: dict[str, int], wrap: int = 1000):
    for i, (name, energy_uj) in enumerate(packages.items()):
        for zone in (root / f"intel-rapl:{i}", root / f"intel-rapl:{i}:0"):  # a package, a subzone
            zone.mkdir(parents=True)
            (zone / "name").write_text(name if zone.name.count(":") == 1 else "core\n")
            (zone / "energy_uj").write_text(str(energy_uj))
            (zone / "max_energy_range_uj").write_text(str(wrap))


def test_rapl_reads_packages_only_and_survives_wraparound(tmp_path):
    rapl_tree(tmp_path, {"package-0": 900, "package-1": 10})
    source = open_power_source(torch.device("cpu"), rapl_root=tmp_path)
    assert isinstance(source, RaplPowerSource)
    assert [r.device for r in source.read()] == ["package-0", "package-1"]
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100")  # wrapped: 900 -> 1000=0 -> 100
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("60")
    readings = {r.device: r for r in source.read()}
    assert readings["package-0"].energy_j == pytest.approx(200e-6)
    assert readings["package-1"].energy_j == pytest.approx(50e-6)
    assert readings["package-0"].power_w is None


def test_no_power_readings_is_logged_with_the_reason(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, "wattserve.power")
    assert open_power_source(torch.device("cpu"), rapl_root=tmp_path) is None
    rapl_tree(tmp_path, {"package-0": 1})
    monkeypatch.setattr("wattserve.engine.power_sources.os.access", lambda path, mode: False)
    assert open_power_source(torch.device("cpu"), rapl_root=tmp_path) is None
    # No NVIDIA driver on the test machine: NVML must fail softly, not raise.
    assert open_power_source(torch.device("cuda:0")) is None
    reasons = [r.getMessage() for r in caplog.records]
    assert reasons[0] == f"no power metrics: no GPU, and no RAPL energy counters under {tmp_path}"
    assert "readable only by root" in reasons[1]
    assert reasons[2].startswith("no power metrics: NVML cannot start") \
        or "nvidia-ml-py is not installed" in reasons[2]


class FakeNvml:
    """pynvml's calls, in its units: mW, mJ, MHz, percent; no temperature sensor."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.shut = False

    def nvmlDeviceGetIndex(self, h):
        return h

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return 123_456_789

    def nvmlDeviceGetPowerUsage(self, h):
        return 250_500

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlShutdown(self):
        self.shut = True


def test_nvml_readings_in_si_units_and_none_where_unsupported():
    nvml = FakeNvml()
    source = NvmlPowerSource(nvml, [3])
    (reading,) = source.read()
    assert reading == PowerReading("gpu3", energy_j=123_456.789, power_w=250.5, temperature_c=None,
                                   sm_clock_hz=1.98e9, utilization=0.87)
    source.close()
    assert nvml.shut


# ---- the sampler -------------------------------------------------------------------------
def test_sampler_uses_counters_and_integrates_power_where_there_is_none():
    clock = Clock()
    # gpu0 has an energy counter (starting at 5000 J) and a power reading; gpu1 only power,
    # ramping 100 W -> 200 W.
    source = ScriptedSource(clock, lambda t: [
        PowerReading("gpu0", energy_j=5000 + 300 * (t - 100), power_w=310.0, temperature_c=50.0),
        PowerReading("gpu1", power_w=100 + 100 * (t - 100)),
    ])
    sampler = PowerSampler(source, interval_s=0.1, average_window_s=1.0, clock=clock)
    first = sampler.sample()
    assert [d.energy_j for d in first.devices] == [0.0, 0.0]
    clock.t += 1.0
    snap = sampler.sample()
    gpu0, gpu1 = snap.devices
    assert gpu0.energy_j == pytest.approx(300.0)  # the counter's delta, not power x time
    assert gpu0.power_w == 310.0 and gpu0.temperature_c == 50.0
    assert gpu1.energy_j == pytest.approx(150.0)  # trapezoid of 100 W -> 200 W over 1 s
    assert snap.power_w == pytest.approx(510.0)
    assert snap.average_power_w == pytest.approx(450.0)  # energy over the window: 450 J / 1 s
    assert snap.energy_at(clock.t + 0.5) == pytest.approx(450.0 + 510.0 * 0.5)


def test_average_power_spans_the_window_only():
    clock = Clock()
    watts = {"now": 100.0}
    sampler = PowerSampler(ScriptedSource(clock, lambda t: [PowerReading("g", power_w=watts["now"])]),
                           interval_s=0.1, average_window_s=1.0, clock=clock)
    for _ in range(30):  # 3 s at 100 W
        sampler.sample()
        clock.t += 0.1
    watts["now"] = 300.0
    for _ in range(10):  # then 1 s at 300 W
        sampler.sample()
        clock.t += 0.1
    snap = sampler.sample()
    assert snap.average_power_w == pytest.approx(300.0, rel=0.11)  # one trapezoid straddles


def test_sampler_thread_samples_and_stops():
    source = ScriptedSource(Clock(), constant(50.0))
    sampler = PowerSampler(source, interval_s=0.01)
    sampler.start()
    first = sampler.snapshot
    assert first is not None  # before start() returns: the engine's first step needs one
    deadline = time.monotonic() + 5
    while sampler.snapshot is first and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler.snapshot is not first and source.closed


# ---- energy of a step --------------------------------------------------------------------
def test_step_energy_at_constant_power_is_power_times_time_and_skips_idle():
    clock = Clock(0.0)
    sampler = PowerSampler(ScriptedSource(clock, constant(200.0)), interval_s=0.1, clock=clock)
    sampler.sample()
    meter = EnergyMeter(sampler)
    assert meter.step_energy(0.0, 0.03) == pytest.approx(6.0)
    assert meter.step_energy(0.0301, 0.05) == pytest.approx(200 * 0.0199)  # the gap is idle
    assert meter.step_energy(2.0, 2.01) == pytest.approx(2.0)  # long idle: not attributed


def test_steps_back_to_back_account_for_the_counter_within_one_sample():
    """Power swings between samples; what the steps get adds up to the counter's delta."""
    clock = Clock(0.0)

    def true_energy(t):  # 300 W plus a 200 W square wave of period 0.35 s
        whole, part = divmod(t, 0.35)
        return 300 * t + 200 * (whole * 0.175 + min(part, 0.175))

    sampler = PowerSampler(ScriptedSource(clock, lambda t: [
        PowerReading("gpu0", energy_j=true_energy(t), power_w=400.0)]), interval_s=0.1, clock=clock)
    sampler.sample()
    meter = EnergyMeter(sampler)
    total, t, next_sample = 0.0, 0.0, 0.1
    while t < 20.0:
        total += meter.step_energy(t, t + 0.013)
        t += 0.013
        if t >= next_sample:  # the sampler thread, out of step with the engine
            clock.t = next_sample
            sampler.sample()
            next_sample += 0.1
    # Off by at most one interval's swing around the last sample: 200 W x 0.1 s.
    assert total == pytest.approx(true_energy(t) - true_energy(0.0), abs=20.0)


# ---- attribution to requests, in a real engine -------------------------------------------
class Recorder(StatsObserver):
    def __init__(self):
        self.steps, self.finished = [], []

    def on_step(self, step):
        self.steps.append(step)

    def on_finished(self, request):
        self.finished.append(request)


@pytest.fixture(scope="module")
def engine():
    from wattserve.engine.core import EngineCore

    core = EngineCore(EngineConfig(cache=CacheConfig(kv_cache_memory=32 << 20),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=256)))
    sampler = PowerSampler(ScriptedSource(Clock(0.0), constant(50.0)), clock=lambda: 0.0)
    sampler.sample()  # constant power from t = 0: energy_at(t) = 50 t exactly
    core.energy_meter = EnergyMeter(sampler)
    return core


def test_a_step_is_split_by_tokens_processed(engine):
    recorder = Recorder()
    engine.observers[:] = [recorder]
    short, long = [1, 2, 3, 4, 5], list(range(10, 25))
    once = SamplingParams(max_tokens=1, temperature=0)
    engine.add_request("short", short, once)
    engine.add_request("long", long, once)
    engine.step()
    (step,) = recorder.steps
    assert step.num_scheduled_tokens == 20
    assert step.energy_j == pytest.approx(50.0 * (step.end - step.start), rel=1e-3)
    energy = {r.prompt_tokens: r.energy_j for r in recorder.finished}
    assert energy[5] == pytest.approx(step.energy_j * 5 / 20)
    assert energy[15] == pytest.approx(step.energy_j * 15 / 20)


def test_every_joule_of_every_step_goes_to_some_request(engine):
    recorder = Recorder()
    engine.observers[:] = [recorder]
    for i, (prompt_len, tokens) in enumerate([(300, 3), (7, 9), (40, 5)]):  # 300: chunked
        engine.add_request(f"r{i}", list(range(1, prompt_len + 1)),
                           SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0))
    while engine.has_work():
        engine.step()
    steps_energy = sum(s.energy_j for s in recorder.steps)
    assert sum(r.energy_j for r in recorder.finished) == pytest.approx(steps_energy, rel=1e-12)
    assert sum(s.num_generation_tokens for s in recorder.steps) == 17
    assert sum(r.generation_tokens for r in recorder.finished) == 17
    assert all(r.energy_j > 0 for r in recorder.finished)


# ---- the power cap -----------------------------------------------------------------------
def fake_core(max_tokens=2048, max_seqs=64):
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens)
    return SimpleNamespace(scheduler=SimpleNamespace(config=config, token_budget=max_tokens),
                           step_pause_s=0.0)


def run_steps(cap, seconds: float, t: float, step_s: float = 0.02) -> float:
    end = t + seconds
    while t < end:
        cap.on_step(StepStats(start=t, end=t + step_s, num_scheduled_tokens=1))
        t += step_s + cap.core.step_pause_s
    return t


def test_throttle_rises_over_the_cap_and_falls_back_under_it():
    core = fake_core()
    power = {"w": 375.0}
    cap = PowerCapController(core, lambda: power["w"], cap_w=250.0)
    t = run_steps(cap, 0.5, 0.0)
    levels = []
    for _ in range(5):
        t = run_steps(cap, 0.5, t)
        levels.append(cap.throttle)
    assert levels == sorted(levels) and 0.5 < levels[-1] < 1  # +0.25 per second at 1.5x the cap
    assert core.scheduler.token_budget == 64  # the floor: every running sequence still decodes
    idle = (2 * cap.throttle - 1) * MAX_IDLE
    assert core.step_pause_s == pytest.approx(idle / (1 - idle) * 0.02)
    t = run_steps(cap, 60, t)
    assert cap.throttle == 1.0 and core.step_pause_s == pytest.approx(0.02 * MAX_IDLE / (1 - MAX_IDLE))

    power["w"] = 100.0
    falling = []
    for _ in range(20):
        t = run_steps(cap, 0.5, t)
        falling.append(cap.throttle)
    assert falling == sorted(falling, reverse=True) and falling[-1] == 0.0
    assert core.scheduler.token_budget == 2048 and core.step_pause_s == 0.0


def test_throttle_settles_where_the_average_power_meets_the_cap():
    """A plant like a decoding GPU: 120 W idle, 600 W busy, a little less at a smaller budget;
    the controller sees a one-second moving average, as the sampler gives it."""
    core = fake_core()
    segments = []  # (start, end, watts) of what the GPU drew

    def average(since: float, until: float) -> float:
        return sum(w * (min(e, until) - max(s, since)) for s, e, w in segments[-300:]
                   if e > since) / (until - since)

    cap = PowerCapController(core, lambda: average(t - 1.0, t), cap_w=350.0)
    t = 0.0
    while t < 40.0:
        pause, busy = core.step_pause_s, 560 + 40 * core.scheduler.token_budget / 2048
        segments += [(t, t + pause, 120.0), (t + pause, t + pause + 0.02, busy)]
        t += pause + 0.02
        cap.on_step(StepStats(start=t - 0.02, end=t, num_scheduled_tokens=1))
    assert 0.5 < cap.throttle < 1
    late = [(s, e, w) for s, e, w in segments if s >= 20.0]
    assert sum(w * (e - s) for s, e, w in late) / (t - 20.0) == pytest.approx(350.0, rel=0.05)
