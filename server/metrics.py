"""Prometheus metrics, in a registry the app owns (so several apps can live in one process).

Engine gauges are read from `engine.stats()` at scrape time, never pushed, so they cannot go
stale; counters are advanced by the routes as tokens flow.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "wattserve:"


class _EngineCollector:
    def __init__(self, engine):
        self._engine = engine

    def collect(self):
        stats = self._engine.stats()
        for name, doc, value in (
            ("num_requests_running", "Requests whose sequences are being decoded.",
             stats.num_running),
            ("num_requests_waiting", "Requests queued for admission.", stats.num_waiting),
            ("kv_cache_blocks_used", "KV cache blocks held by requests.",
             stats.num_total_blocks - stats.num_free_blocks),
            ("kv_cache_blocks_total", "KV cache blocks allocated at startup.",
             stats.num_total_blocks),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled.",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.",
                                         registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
