"""The one async interface the server uses: generate (an async iterator of outputs) and abort.

The synchronous EngineCore runs in its own thread so the event loop (HTTP) never waits on a
model step. Requests and aborts cross into that thread through a queue; outputs cross back
with `loop.call_soon_threadsafe` into one asyncio.Queue per request.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from wattserve.engine.config import EngineConfig
from wattserve.engine.core import EngineCore, EngineStats
from wattserve.engine.request import EngineDead, QueueFull, RequestOutput, SamplingParams
from wattserve.engine.slo import SLO

log = logging.getLogger("wattserve.engine")


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    slo: SLO | None


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncEngine:
    def __init__(self, core: EngineCore):
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_config = core.model_config
        self.max_model_len = core.max_model_len
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending = 0  # added but not yet seen by the engine thread; counts toward the queue

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(EngineCore(config))

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="wattserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._inbox.put(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ---- requests --------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        slo: SLO | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes. Raises InvalidRequestError (bad
        parameters, prompt too long), QueueFull or EngineDead before the first output.
        Closing the iterator early (client disconnect) aborts the request. `slo` is the
        latency the request is judged against, in the engine's stats."""
        arrival_time = time.monotonic()  # TTFT counts the wait for a busy engine thread too
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        self.core.check_request(prompt_token_ids, params)
        if self.core.stats().num_waiting + self._pending >= self.core.max_queue_len:
            raise QueueFull(f"{self.core.max_queue_len} requests are already waiting")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._pending += 1
        self._inbox.put(_Add(request_id, prompt_token_ids, params, arrival_time, slo))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # ---- engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                # Block only when idle; otherwise take whatever arrived and step.
                block = not self.core.has_work()
                while True:
                    try:
                        msg = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if isinstance(msg, _Stop):
                        self.core.abort_all()
                        return
                    self._handle(msg)
                if self.core.has_work():
                    self._deliver(self.core.step())
        except BaseException as exc:  # the loop died: fail every open request, not hang it
            log.exception("engine loop failed")
            self._error = exc
            dead = EngineDead(f"engine loop failed: {exc}")
            for rid in list(self._streams):
                self._post(rid, dead)

    def _handle(self, msg: _Add | _Abort) -> None:
        if isinstance(msg, _Add):
            self._loop.call_soon_threadsafe(self._dec_pending)
            if msg.request_id not in self._streams:
                return  # aborted before the engine saw it
            try:
                self.core.add_request(msg.request_id, msg.prompt_token_ids, msg.params,
                                      msg.arrival_time, msg.slo)
            except Exception as exc:  # validated already; a race (e.g. shutdown) lands here
                self._post(msg.request_id, exc)
        else:
            self.core.abort(msg.request_id)

    def _dec_pending(self) -> None:
        self._pending -= 1

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._post(out.request_id, out)

    def _post(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)
