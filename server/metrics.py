"""Prometheus metrics, in a registry the app owns (so several apps can live in one process).

Names and types follow vLLM's (`vllm:` becomes `wattserve:`), so dashboards and alerts written
for vLLM carry over; every series has a `model_name` label. Two ways in:

- pushed: Metrics is an engine StatsObserver; the engine client hands it each step's and each
  finished request's stats (from the core process, with the step's outputs) before the
  outputs reach their clients, so a client that has its answer already sees it counted.
  prometheus_client's metrics are thread-safe; the engine never imports prometheus_client.
- pulled at scrape time (server/metrics_collectors.py): gauges of the engine's state (queue
  lengths, KV blocks, power samples, the throttle) from its latest snapshot, which the core
  sends with every step and twice a second while idle.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from wattserve.engine.client import EngineInfo, EngineSnapshot
from wattserve.engine.request import FinishReason
from wattserve.engine.slo import SLO
from wattserve.engine.stats import RequestStats, StatsObserver, StepStats
from wattserve.server.metrics_collectors import PREFIX, EngineCollector, PowerCollector, SLOCollector
from wattserve.server.window import SlidingWindow

# vLLM's buckets; the per-token ones start lower, as a GPU decode step takes ~10 ms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def one_two_five(low: float, high: float) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... from `low` up to the first bound >= `high` (vLLM's scheme)."""
    bounds, scale = [], low
    while True:
        for mantissa in (1, 2, 5):
            bounds.append(mantissa * scale)
            if bounds[-1] >= high:
                return bounds
        scale *= 10


class Metrics(StatsObserver):
    def __init__(self, snapshot: Callable[[], EngineSnapshot], info: EngineInfo, model_name: str,
                 window_s: float = 60.0, slo: SLO | None = None):
        """`snapshot`: the engine's state now, for the gauges read at scrape time."""
        self.registry = CollectorRegistry()
        self._model = model_name
        now = time.monotonic()
        self._slo_window = SlidingWindow(window_s, 3, now)  # with an SLO, met, met tokens
        power = info.power_average_window_s is not None
        self._energy_window = SlidingWindow(window_s, 2, now) if power else None  # J, tokens

        def counter(name: str, doc: str):
            return Counter(PREFIX + name, doc, ["model_name"],
                           registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets):
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        tokens = one_two_five(1, info.max_model_len)
        self.prompt_tokens = counter("prompt_tokens",
                                     "Prompt tokens of requests that began answering.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted to free KV blocks.")
        self.step_seconds = counter("engine_step_seconds",
                                    "Wall time of engine steps: scheduling, forward pass, sampling "
                                    "(power-cap pauses excluded).")
        self.gpu_busy = counter("gpu_busy_seconds",
                                "GPU time of the forward passes of engine steps (CUDA events); "
                                "1 - its increase / engine_step_seconds' increase is the share "
                                "of step time the GPU sat idle.") if info.gpu_timed else None
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        self._success = Counter(PREFIX + "request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in FinishReason:
            self._success.labels(model_name, reason.value)
        self.ttft = histogram("time_to_first_token_seconds",
                              "From arrival to the first output token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Between a request's consecutive outputs.", TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Per request, (e2e - TTFT) / (output tokens - 1) as DistServe "
                              "defines TPOT; requests of one token have none.",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From arrival to the last token.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "From arrival to the first step that ran the request.",
                               REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds",
                                 "From the first step that ran the request to its first token.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds",
                                "From the first output token to the last.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds",
                                   "From the first step that ran the request to its last token.",
                                   REQUEST_LATENCY_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.generation_len = histogram("request_generation_tokens", "Output tokens per request.",
                                        tokens)
        self.slo_requests = counter("slo_requests", "Finished requests that had a latency SLO.")
        self.slo_ttft_met = counter("slo_ttft_met", "Requests with an SLO whose TTFT met it.")
        self.slo_tpot_met = counter("slo_tpot_met", "Requests with an SLO whose TPOT met it.")
        self.slo_met = counter("slo_met", "Requests with an SLO that met both TTFT and TPOT.")
        self.registry.register(EngineCollector(snapshot, model_name))
        self.registry.register(SLOCollector(self._slo_window, model_name, slo))
        if power:
            self.energy = counter("inference_energy_joules",
                                  "Energy of engine steps (idle time excluded), attributed to "
                                  "the tokens they processed.")
            self.request_energy = histogram("request_energy_joules",
                                            "Energy attributed to each request.",
                                            one_two_five(0.1, 1e5))
            self.registry.register(PowerCollector(snapshot, info, self._energy_window, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- the engine's stats, before the step's outputs reach their clients ----------------
    def on_step(self, step: StepStats) -> None:
        self.prompt_tokens.inc(step.num_prompt_tokens)
        self.generation_tokens.inc(step.num_generation_tokens)
        self.preemptions.inc(step.num_preemptions)
        self.prefix_cache_queries.inc(step.prefix_cache_queries)
        self.prefix_cache_hits.inc(step.prefix_cache_hits)
        self.step_seconds.inc(step.end - step.start)
        if self.gpu_busy is not None and step.gpu_busy_s is not None:
            self.gpu_busy.inc(step.gpu_busy_s)
        for seconds in step.time_to_first_tokens:
            self.ttft.observe(seconds)
        for seconds in step.inter_token_latencies:
            self.itl.observe(seconds)
        if self._energy_window is not None and step.energy_j is not None:
            self.energy.inc(step.energy_j)
            self._energy_window.add(step.end, step.energy_j, step.num_generation_tokens)

    def on_finished(self, request: RequestStats) -> None:
        self._success.labels(self._model, request.finish_reason.value).inc()
        if request.finish_reason == FinishReason.ABORT:
            return  # its latencies end where the client gave up: they would skew the rest
        self.e2e.observe(request.e2e)
        self.queue.observe(request.queue_time)
        self.prefill.observe(request.prefill_time)
        self.decode.observe(request.decode_time)
        self.inference.observe(request.inference_time)
        self.prompt_len.observe(request.prompt_tokens)
        self.generation_len.observe(request.generation_tokens)
        if request.tpot is not None:
            self.tpot.observe(request.tpot)
        if self._energy_window is not None:
            self.request_energy.observe(request.energy_j)
        if request.slo is not None:
            result = request.slo.check(request.ttft, request.tpot)
            self.slo_requests.inc()
            self.slo_ttft_met.inc(result.ttft_met)
            self.slo_tpot_met.inc(result.tpot_met)
            self.slo_met.inc(result.met)
            self._slo_window.add(request.finish_time, 1, result.met,
                                 request.generation_tokens if result.met else 0)
