"""`wattserve top`: a live terminal view of a server's /metrics, like `top` for one server.

Rates and latency percentiles are over the interval between two scrapes (histogram bucket
deltas, interpolated as Prometheus' histogram_quantile does); gauges are the latest values.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.live import Live
from rich.table import Table

P = "wattserve:"


class Scrape:
    """One /metrics text: sample values by name, summed over labels, plus per-device rows."""

    def __init__(self, text: str, now: float):
        self.time = now
        self.values: dict[str, float] = defaultdict(float)
        self.buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        self.devices: dict[str, dict[str, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if "le" in s.labels:
                    self.buckets[s.name][float(s.labels["le"])] += s.value
                elif "device" in s.labels:
                    self.devices[s.labels["device"]][s.name] = s.value
                else:
                    self.values[s.name] += s.value

    def has(self, name: str) -> bool:
        return P + name in self.values


def quantile(q: float, buckets: dict[float, float]) -> float:
    """histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def render(prev: Scrape, cur: Scrape) -> Group:
    dt = max(cur.time - prev.time, 1e-9)

    def rate(name: str) -> float:
        return (cur.values[P + name] - prev.values[P + name]) / dt

    def pct(name: str, q: float) -> str:
        new = cur.buckets[P + name + "_bucket"]
        delta = {b: c - prev.buckets[P + name + "_bucket"].get(b, 0.0) for b, c in new.items()}
        return _ms(quantile(q, delta))

    v = cur.values
    load = Table(title="wattserve top", show_header=True, expand=True)
    for column in ("running", "waiting", "KV cache", "prompt tok/s", "gen tok/s", "req/s",
                   "preempt/s"):
        load.add_column(column, justify="right")
    load.add_row(f"{v[P + 'num_requests_running']:.0f}", f"{v[P + 'num_requests_waiting']:.0f}",
                 f"{v[P + 'kv_cache_usage_perc']:.0%}", f"{rate('prompt_tokens_total'):.1f}",
                 f"{rate('generation_tokens_total'):.1f}", f"{rate('request_success_total'):.2f}",
                 f"{rate('num_preemptions_total'):.2f}")
    latency = Table(show_header=True, expand=True)
    for column in ("", "p50", "p90", "p99", "SLO"):
        latency.add_column(column, justify="right")
    for label, name, slo in (("TTFT", "time_to_first_token_seconds", "slo_ttft_seconds"),
                             ("TPOT", "time_per_output_token_seconds", "slo_tpot_seconds"),
                             ("inter-token", "inter_token_latency_seconds", None)):
        bound = _ms(v[P + slo]) if slo and cur.has(slo) else "-"
        latency.add_row(label, pct(name, 0.5), pct(name, 0.9), pct(name, 0.99), bound)
    slo = Table(show_header=True, expand=True)
    for column in ("SLO attainment", "goodput req/s", "goodput tok/s"):
        slo.add_column(column, justify="right")
    slo.add_row(_fmt(v[P + "slo_attainment"], "{:.1%}"),
                f"{v[P + 'goodput_requests_per_second']:.2f}",
                f"{v[P + 'goodput_tokens_per_second']:.1f}")
    parts = [load, latency, slo]
    if cur.devices:
        parts.append(_power_table(cur))
    return Group(*parts)


def _power_table(cur: Scrape) -> Table:
    v = cur.values
    table = Table(show_header=True, expand=True)
    for column in ("device", "W", "J", "°C", "SM MHz", "util"):
        table.add_column(column, justify="right")
    for device, d in sorted(cur.devices.items()):
        table.add_row(device, _fmt(d.get(P + "device_power_watts"), "{:.0f}"),
                      _fmt(d.get(P + "device_energy_joules_total"), "{:.0f}"),
                      _fmt(d.get(P + "device_temperature_celsius"), "{:.0f}"),
                      _fmt(d.get(P + "device_sm_clock_hertz", math.nan) / 1e6, "{:.0f}"),
                      _fmt(d.get(P + "device_utilization_ratio"), "{:.0%}"))
    cap = "no cap"
    if cur.has("power_cap_watts"):
        cap = (f"cap {v[P + 'power_cap_watts']:.0f} W, throttle {v[P + 'power_throttle']:.0%}, "
               f"budget {v[P + 'scheduler_token_budget']:.0f} tok")
    table.caption = (f"average {v[P + 'power_average_watts']:.0f} W | "
                     f"{_fmt(v[P + 'energy_per_output_token_joules'], '{:.3f}')} J/token | "
                     f"{_fmt(v[P + 'output_tokens_per_joule'], '{:.1f}')} tokens/J | {cap}")
    return table


def _ms(seconds: float) -> str:
    return _fmt(seconds * 1e3, "{:.1f} ms")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else spec.format(value)


def run(url: str, interval: float) -> None:
    """Redraw every `interval` seconds until Ctrl-C."""
    with httpx.Client(base_url=url, timeout=10) as client:
        def scrape() -> Scrape:
            return Scrape(client.get("/metrics").raise_for_status().text, time.monotonic())

        try:
            prev = scrape()
            with Live(auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    cur = scrape()
                    live.update(render(prev, cur), refresh=True)
                    prev = cur
        except httpx.HTTPError as exc:
            raise SystemExit(f"wattserve top: {url}/metrics: {exc}") from None
        except KeyboardInterrupt:
            pass
