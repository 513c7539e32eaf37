"""Gauges read at scrape time from where the state already lives, so they cannot go stale."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wattserve.engine.client import EngineInfo, EngineSnapshot
from wattserve.engine.slo import SLO
from wattserve.server.window import SlidingWindow

PREFIX = "wattserve:"  # vLLM's "vllm:", renamed


def _gauge(name: str, doc: str, value: float, model_name: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric([model_name], value)
    return family


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


class EngineCollector:
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str):
        self._snapshot, self._model = snapshot, model_name

    def collect(self):
        stats = self._snapshot().stats
        used = stats.num_total_blocks - stats.num_free_blocks
        for name, doc, value in (
            ("num_requests_running", "Requests whose sequences are being decoded.",
             stats.num_running),
            ("num_requests_waiting", "Requests queued for admission.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use, 0..1.",
             _ratio(used, stats.num_total_blocks)),
            ("kv_cache_blocks_used", "KV cache blocks held by requests.", used),
            ("kv_cache_blocks_total", "KV cache blocks allocated at startup.",
             stats.num_total_blocks),
        ):
            yield _gauge(name, doc, value, self._model)


class SLOCollector:
    """Attainment and goodput over the sliding window, and the server's default SLO (the
    lines a dashboard draws under the latency percentiles)."""

    def __init__(self, window: SlidingWindow, model_name: str, slo: SLO | None):
        self._window, self._model, self._slo = window, model_name, slo

    def collect(self):
        seconds, (with_slo, met, met_tokens) = self._window.totals(time.monotonic())
        span = f" over the last {self._window.span_s:g} s"
        yield _gauge("slo_attainment", "Fraction of requests with an SLO that met it" + span
                     + "; NaN if none finished.", _ratio(met, with_slo), self._model)
        yield _gauge("goodput_requests_per_second", "Requests that met their SLO per second"
                     + span + ".", met / seconds if seconds else 0.0, self._model)
        yield _gauge("goodput_tokens_per_second", "Output tokens of requests that met their SLO "
                     "per second" + span + ".", met_tokens / seconds if seconds else 0.0,
                     self._model)
        if self._slo is not None and self._slo.ttft_s is not None:
            yield _gauge("slo_ttft_seconds", "The server's default TTFT SLO.", self._slo.ttft_s,
                         self._model)
        if self._slo is not None and self._slo.tpot_s is not None:
            yield _gauge("slo_tpot_seconds", "The server's default TPOT SLO.", self._slo.tpot_s,
                         self._model)


class PowerCollector:
    """Each device's last sample, the energy-per-token window and the power cap's state."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], info: EngineInfo,
                 window: SlidingWindow, model_name: str):
        self._snapshot, self._info, self._window, self._model = snapshot, info, window, model_name

    def collect(self):
        engine = self._snapshot()
        snap = engine.power
        if snap is None:
            return
        labels = ["model_name", "device"]
        families = {
            "power_w": GaugeMetricFamily(PREFIX + "device_power_watts",
                                         "Power draw of each device.", labels=labels),
            "energy_j": CounterMetricFamily(PREFIX + "device_energy_joules",
                                            "Energy each device drew since the server started, "
                                            "idle included.", labels=labels),
            "temperature_c": GaugeMetricFamily(PREFIX + "device_temperature_celsius",
                                               "Temperature of each device.", labels=labels),
            "sm_clock_hz": GaugeMetricFamily(PREFIX + "device_sm_clock_hertz",
                                             "SM clock of each GPU.", labels=labels),
            "utilization": GaugeMetricFamily(PREFIX + "device_utilization_ratio",
                                             "Fraction of time each GPU was busy, 0..1.",
                                             labels=labels),
        }
        for device in snap.devices:
            for field, family in families.items():
                value = getattr(device, field)
                if value is not None:
                    family.add_metric([self._model, device.device], value)
        yield from (f for f in families.values() if f.samples)
        yield _gauge("power_average_watts", f"Power of all devices, averaged over "
                     f"{self._info.power_average_window_s:g} s (what a power cap compares).",
                     snap.average_power_w, self._model)
        _, (energy, tokens) = self._window.totals(time.monotonic())
        span = f" over the last {self._window.span_s:g} s"
        yield _gauge("energy_per_output_token_joules", "Energy of engine steps per output token"
                     + span + "; prefill energy included.", _ratio(energy, tokens), self._model)
        yield _gauge("output_tokens_per_joule", "Output tokens per joule of engine steps" + span
                     + ".", _ratio(tokens, energy), self._model)
        if engine.power_cap is not None:
            yield _gauge("power_cap_watts", "The --power-cap-watts the engine keeps under.",
                         self._info.power_cap_w, self._model)
            yield _gauge("power_throttle", "0: unthrottled; 0.5: token budget at its floor; "
                         "1: the engine idles 90% of the time.", engine.power_cap.throttle,
                         self._model)
            yield _gauge("scheduler_token_budget", "Tokens the scheduler admits per step now.",
                         engine.power_cap.token_budget, self._model)
