"""EngineClient: the one interface through which the server reaches the engine.

generate (an async iterator of a request's outputs), abort, what the engine serves (info),
its state for the gauges (snapshot), and observers of its per-step and per-request stats.
Two implementations share the request streams kept here: MPClient (engine/mp_client.py)
runs the engine core in its own process, which is how `wattserve serve` runs it; InprocClient
(engine/inproc_client.py) steps it on a thread of this process, for tests that inject fakes.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

from wattserve.engine.output_processor import OutputProcessor
from wattserve.engine.power import PowerSnapshot
from wattserve.engine.request import (
    EngineDead, InvalidRequestError, RequestOutput, SamplingParams, check_request, merge_outputs,
)
from wattserve.engine.slo import SLO
from wattserve.engine.stats import EngineStats, StatsObserver
from wattserve.engine.tokenizer import Tokenizer


@dataclass
class EngineInfo:
    """What the engine serves, fixed once its model is loaded."""

    model_name: str
    model_path: str  # what was loaded, for the startup log
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    gpu_timed: bool  # steps report their forward passes' GPU time (StepStats.gpu_busy_s)
    power_average_window_s: float | None  # None: no power readings
    power_cap_w: float | None


@dataclass
class PowerCapState:
    throttle: float
    token_budget: int


@dataclass
class EngineSnapshot:
    """The engine's state for gauges read at scrape time."""

    stats: EngineStats
    power: PowerSnapshot | None
    power_cap: PowerCapState | None


class EngineClient:
    """The request streams; subclasses carry requests to the core and its outputs back."""

    def __init__(self, info: EngineInfo, tokenizer: Tokenizer):
        self.info = info
        self.tokenizer = tokenizer
        self._streams: dict[str, asyncio.Queue] = {}
        self._outputs = OutputProcessor(tokenizer)
        self._error: EngineDead | None = None
        self._started = False

    # ---- what a subclass provides ------------------------------------------------------
    def _send(self, message: tuple) -> None:
        """Deliver a message of engine/core_loop.py to the core loop."""
        raise NotImplementedError

    async def start(self) -> None:
        """Begin taking requests; call from the event loop that will consume outputs."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine."""
        raise NotImplementedError

    def snapshot(self) -> EngineSnapshot:
        raise NotImplementedError

    def add_observer(self, observer: StatsObserver) -> None:
        """`observer` sees every step and finished request before their outputs are handed out."""
        raise NotImplementedError

    # ---- state ------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    @property
    def is_alive(self) -> bool:
        return self._started and self._error is None

    @property
    def error(self) -> EngineDead | None:
        """Why the engine died, if it did."""
        return self._error

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       slo: SLO | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes. Raises InvalidRequestError (bad
        parameters, prompt too long), QueueFull or EngineDead before the first output.
        Closing the iterator early (client disconnect) aborts the request. `slo` is the
        latency the request is judged against, in the engine's stats."""
        arrival_time = time.monotonic()  # TTFT counts the trip to the engine too
        if not self.is_alive:
            raise self._error or EngineDead("the engine is not running")
        check_request(prompt_token_ids, params, self.info.vocab_size, self.info.max_model_len)
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._outputs.add(request_id, prompt_token_ids, params)
        self._send(("add", request_id, prompt_token_ids, params, arrival_time, slo))
        finished = False
        try:
            while True:
                # Outputs that queued up while this consumer waited its turn go out as one.
                item, ready = await stream.get(), []
                while isinstance(item, RequestOutput):
                    ready.append(item)
                    item = None if item.finished or stream.empty() else stream.get_nowait()
                if ready:
                    out = ready[0] if len(ready) == 1 else merge_outputs(ready)
                    yield out
                    if out.finished:
                        finished = True
                        return
                if item is not None:
                    raise item
        finally:
            self._streams.pop(request_id, None)
            self._outputs.remove(request_id)
            if not finished and self.is_alive:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._outputs.remove(request_id)
        self._send(("abort", request_id))

    def end_all(self, error: EngineDead) -> None:
        """End every open request with `error` (their iterators raise it, which aborts them
        in the engine): the engine died, or the server's shutdown grace ran out."""
        for stream in self._streams.values():
            stream.put_nowait(error)

    # ---- for subclasses, on the event loop --------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], errors: dict[str, Exception]) -> None:
        """A core message's outputs (token ids) and refusals, to their streams, with text."""
        for request_id, error in errors.items():
            self._post(request_id, error)
        for out in self._outputs.process_all(outputs, self._stop):
            self._post(out.request_id, out)

    def _stop(self, request_id: str, indices: list[int]) -> None:
        """Stop strings ended these sequences: the core runs them no more."""
        self._send(("stop", request_id, indices))

    def _post(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:  # else aborted while the step ran
            stream.put_nowait(item)

    def _die(self, error: EngineDead) -> None:
        if self._error is None:
            self._error = error
            self.end_all(error)
