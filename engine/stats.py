"""What the engine measures, per step and per request, for whoever observes it.

The engine only records timestamps (time.monotonic seconds) and counts and hands them to its
observers on the engine thread; observers turn them into Prometheus series (server/metrics.py)
or control actions (engine/power_cap.py). So the engine never imports prometheus_client and
its tests can watch it with a plain list.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wattserve.engine.request import FinishReason
from wattserve.engine.slo import SLO


@dataclass
class EngineStats:
    """The engine's state now: what the queue and KV-cache gauges show."""

    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int


@dataclass
class StepStats:
    """One engine step: what it processed, what it produced, what it cost."""

    start: float
    end: float
    num_scheduled_tokens: int  # prompt chunks and decodes the model processed
    num_preemptions: int = 0
    energy_j: float | None = None  # None: no power source
    gpu_busy_s: float | None = None  # GPU time of the forward pass (CUDA only; see gpu_timer.py)
    # Tokens of the sequences admitted this step (a preempted one again when it comes back),
    # and of those, the tokens found in the prefix cache; both 0 with prefix caching off.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # A prompt counts once, when its request's first token comes (as vLLM counts it), so a
    # prompt prefilled again after a preemption is not counted twice.
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)  # one per request per step


@dataclass
class RequestStats:
    """One request's timeline and totals; a request with n choices is one request."""

    arrival_time: float
    prompt_tokens: int
    slo: SLO | None = None
    scheduled_time: float | None = None  # first step that processed any of its tokens
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    generation_tokens: int = 0
    energy_j: float = 0.0  # its share of the energy of every step that processed its tokens

    def record_tokens(self, n: int, now: float, step: StepStats) -> None:
        """`n` tokens were sampled for this request in `step`, ending at `now`."""
        if self.first_token_time is None:
            self.first_token_time = now
            step.num_prompt_tokens += self.prompt_tokens
            step.time_to_first_tokens.append(now - self.arrival_time)
        else:
            step.inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now
        self.generation_tokens += n
        step.num_generation_tokens += n

    # The properties below hold for requests that produced a token (not for every abort).
    @property
    def queue_time(self) -> float:
        return self.scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def prefill_time(self) -> float:
        return self.first_token_time - self.scheduled_time

    @property
    def decode_time(self) -> float:
        return self.last_token_time - self.first_token_time

    @property
    def inference_time(self) -> float:
        return self.last_token_time - self.scheduled_time

    @property
    def tpot(self) -> float | None:
        """DistServe's time per output token, (e2e - TTFT) / (output tokens - 1); None for a
        single token, which has no time between tokens."""
        if self.generation_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.generation_tokens - 1)


class StatsObserver:
    """Told about every step and every finished request, on the engine thread, before the
    step's outputs reach their clients: implementations must be quick and never block."""

    def on_step(self, step: StepStats) -> None:
        pass

    def on_finished(self, request: RequestStats) -> None:
        pass
