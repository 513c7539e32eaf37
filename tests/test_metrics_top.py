"""`wattserve top`: percentiles from bucket deltas, and one frame rendered from real metrics."""
import math
import time

import pytest
from rich.console import Console

from conftest import engine_info
from wattserve.engine.client import EngineSnapshot, PowerCapState
from wattserve.engine.power import PowerReading, PowerSampler
from wattserve.engine.request import FinishReason
from wattserve.engine.slo import SLO
from wattserve.engine.stats import EngineStats, RequestStats, StepStats
from wattserve.server.metrics import Metrics
from wattserve.server.top import Scrape, quantile, render


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    buckets = {0.1: 10.0, 0.2: 30.0, 0.5: 40.0, math.inf: 40.0}
    assert quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20 of 40: halfway in (0.1, 0.2]
    assert quantile(0.25, buckets) == pytest.approx(0.1)
    assert quantile(0.99, buckets) == pytest.approx(0.2 + 0.3 * (39.6 - 30) / 10)
    assert math.isnan(quantile(0.5, {0.1: 0.0, math.inf: 0.0}))


class OneGpu:
    name = "fake"

    def read(self):
        return [PowerReading("gpu0", energy_j=1000.0, power_w=420.0, temperature_c=61.0,
                             sm_clock_hz=1.98e9, utilization=0.93)]

    def close(self):
        pass


BUSY = EngineStats(num_running=3, num_waiting=1, num_total_blocks=100, num_free_blocks=75)


def test_a_frame_shows_load_latency_slo_and_power():
    power = PowerSampler(OneGpu())
    power.sample()
    engine = EngineSnapshot(BUSY, power.snapshot, PowerCapState(throttle=0.0, token_budget=2048))
    info = engine_info(power_average_window_s=power.average_window_s, power_cap_w=500.0)
    metrics = Metrics(lambda: engine, info, "m", slo=SLO(0.5, 0.05))
    before = Scrape(metrics.render().decode(), now=0.0)
    now = time.monotonic()
    for i in range(10):  # ten requests: TTFT 0.1 s .. 1.0 s, 20 ms per token, 40 tokens
        stats = RequestStats(arrival_time=now - 2, prompt_tokens=30, slo=SLO(0.5, 0.05))
        stats.scheduled_time = stats.arrival_time
        stats.first_token_time = stats.arrival_time + 0.1 * (i + 1)
        stats.last_token_time = stats.finish_time = stats.first_token_time + 0.02 * 39
        stats.generation_tokens, stats.finish_reason = 40, FinishReason.LENGTH
        metrics.on_step(StepStats(now - 1, now, 70, energy_j=8.0, num_prompt_tokens=30,
                                  num_generation_tokens=40, time_to_first_tokens=[stats.ttft]))
        metrics.on_finished(stats)
    after = Scrape(metrics.render().decode(), now=2.0)
    console = Console(record=True, width=120)
    console.print(render(before, after))
    text = console.export_text()
    for needle in ("3", "25%",  # running, KV cache usage
                   "200.0",  # 400 generated tokens over 2 s
                   "500.0 ms",  # the TTFT SLO line
                   "50.0%",  # 5 of 10 met TTFT <= 0.5 s
                   "gpu0", "420", "61", "1980", "93%",
                   "0.200 J/token", "cap 500 W, throttle 0%"):
        assert needle in text, needle
