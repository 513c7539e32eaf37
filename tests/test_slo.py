"""SLOs as DistServe defines them, per-request overrides, and the sliding window behind
attainment and goodput. No model, no server: the live checks are in test_metrics.py."""
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import engine_info
from wattserve.engine.client import EngineSnapshot
from wattserve.engine.stats import EngineStats
from wattserve.engine.request import FinishReason
from wattserve.engine.slo import SLO
from wattserve.engine.stats import RequestStats, StepStats
from wattserve.server.metrics import Metrics
from wattserve.server.protocol import ChatCompletionRequest, SLOSpec
from wattserve.server.window import SlidingWindow


def finished(ttft: float, tokens: int, tpot: float, arrival: float = 1000.0) -> RequestStats:
    stats = RequestStats(arrival_time=arrival, prompt_tokens=10)
    stats.scheduled_time = arrival + ttft / 2
    stats.first_token_time = arrival + ttft
    stats.last_token_time = stats.finish_time = stats.first_token_time + tpot * (tokens - 1)
    stats.generation_tokens = tokens
    stats.finish_reason = FinishReason.LENGTH
    return stats


def test_tpot_is_the_rest_of_the_latency_over_the_rest_of_the_tokens():
    stats = finished(ttft=0.5, tokens=11, tpot=0.02)
    assert stats.ttft == pytest.approx(0.5)
    assert stats.e2e == pytest.approx(0.7)
    assert stats.tpot == pytest.approx((0.7 - 0.5) / 10)
    assert finished(ttft=0.5, tokens=1, tpot=0).tpot is None


@pytest.mark.parametrize("slo, ttft, tpot, expected", [
    (SLO(0.2, 0.05), 0.2, 0.05, (True, True)),  # bounds are inclusive
    (SLO(0.2, 0.05), 0.21, 0.01, (False, True)),
    (SLO(0.2, 0.05), 0.1, 0.06, (True, False)),
    (SLO(0.2, 0.05), 0.1, None, (True, True)),  # one token: no TPOT to miss
    (SLO(ttft_s=0.2), 0.1, 9.0, (True, True)),  # an unset bound is met
    (SLO(tpot_s=0.05), 9.0, 0.01, (True, True)),
])
def test_a_request_meets_its_slo_when_both_bounds_hold(slo, ttft, tpot, expected):
    result = slo.check(ttft, tpot)
    assert (result.ttft_met, result.tpot_met) == expected
    assert result.met == all(expected)


def test_a_request_overrides_the_server_slo_field_by_field():
    server = SLO(ttft_s=1.0, tpot_s=0.1)
    assert SLOSpec(ttft_ms=200).over(server) == SLO(ttft_s=0.2, tpot_s=0.1)
    assert SLOSpec(tpot_ms=50).over(None) == SLO(tpot_s=0.05)
    assert SLOSpec().over(None) is None
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "slo": {"ttft_ms": 5, "tpot_ms": 1}})
    assert body.slo.over(None) == SLO(0.005, 0.001)
    with pytest.raises(ValueError):
        SLOSpec(ttft_ms=0)


def test_window_sums_the_last_seconds_only():
    window = SlidingWindow(10.0, 2, now=100.0)
    assert window.totals(100.0) == (0.0, [0.0, 0.0])
    window.add(100.2, 1, 5)
    window.add(100.7, 1, 7)
    window.add(104.5, 1, 1)
    assert window.totals(105.0) == (5.0, [3.0, 13.0])  # a young server: 5 s so far
    assert window.totals(111.5) == (10.0, [1.0, 1.0])  # the 100 s bucket has left
    assert window.totals(200.0) == (10.0, [0.0, 0.0])


def idle_engine() -> EngineSnapshot:
    return EngineSnapshot(EngineStats(num_running=0, num_waiting=0, num_total_blocks=10,
                                      num_free_blocks=10), None, None)


def scrape(metrics: Metrics) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples if "le" not in s.labels and "finished_reason" not in s.labels}


def test_slo_counters_attainment_and_goodput():
    import time

    now = time.monotonic()
    metrics = Metrics(idle_engine, engine_info(), "m", window_s=60.0, slo=SLO(0.2, 0.05))
    tight = SLO(ttft_s=0.2, tpot_s=0.05)
    for ttft, tokens, tpot, slo in [(0.1, 10, 0.01, tight), (0.3, 10, 0.01, tight),
                                    (0.1, 4, 0.09, tight), (0.1, 1, 0, tight),
                                    (9.0, 10, 9.0, None)]:
        stats = finished(ttft, tokens, tpot, arrival=now - 30)
        stats.slo = slo
        metrics.on_step(StepStats(stats.arrival_time, stats.finish_time, 10,
                                  num_generation_tokens=tokens))
        metrics.on_finished(stats)
    m = scrape(metrics)
    assert m["wattserve:slo_requests_total"] == 4  # the last request had no SLO
    assert m["wattserve:slo_ttft_met_total"] == 3
    assert m["wattserve:slo_tpot_met_total"] == 3
    assert m["wattserve:slo_met_total"] == 2
    assert m["wattserve:slo_attainment"] == 0.5
    # A young server's rates are over its life so far, which is shorter than this test's.
    assert m["wattserve:goodput_requests_per_second"] >= 2 / (time.monotonic() - now)
    assert m["wattserve:goodput_tokens_per_second"] == pytest.approx(
        m["wattserve:goodput_requests_per_second"] * 11 / 2)
    assert m["wattserve:slo_ttft_seconds"] == 0.2 and m["wattserve:slo_tpot_seconds"] == 0.05
    assert m["wattserve:generation_tokens_total"] == 35
    assert m["wattserve:time_per_output_token_seconds_count"] == 4  # not the 1-token one
    assert m["wattserve:e2e_request_latency_seconds_count"] == 5


def test_no_slo_finished_yet_is_nan_attainment_and_zero_goodput():
    m = scrape(Metrics(idle_engine, engine_info(), "m"))
    assert math.isnan(m["wattserve:slo_attainment"])
    assert m["wattserve:goodput_requests_per_second"] == 0.0
    assert "wattserve:slo_ttft_seconds" not in m  # no server SLO: no line to draw
    assert "wattserve:device_power_watts" not in m  # no power source: no power metrics
