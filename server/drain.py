"""Shutdown that finishes what runs: uvicorn with a drain before it stops.

On SIGTERM (or Ctrl-C) uvicorn would close its socket at once, so new requests would be
refused at the TCP level, and when its grace period ran out it would cancel what still ran:
a plain-text 500, or a stream cut with no error event. Here the first signal starts a drain
instead: the socket stays open and new requests get an OpenAI-shaped 503 (`/health` says
draining), the open ones run on for up to the grace period, then whatever is left ends with
an error its route turns into a 503 or an SSE error event and [DONE]. Only then does uvicorn
shut down, with nothing left to cut, and the process exits 0. A second signal stops at once.
If the engine dies, the server stops the same way and `serve` exits 1.
"""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from wattserve.engine.request import EngineDead
from wattserve.server.state import ServerState

log = logging.getLogger("wattserve.server")
POLL_S = 0.05
# After the grace period, how long the routes get to write the errors of what was ended.
ENDED_WRITE_S = 2.0
# After the engine died, how long /health keeps answering 503 (rather than refusing the
# connection), so that probes and load balancers see why the server goes away.
DEATH_LINGER_S = 1.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float):
        super().__init__(config)
        self._state = state
        self._grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._state.draining or self._loop is None:
            return super().handle_exit(sig, frame)  # a second signal, or before startup
        self._state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def stop_after(self, reason: str) -> None:
        """Stop as a drain whose grace is over at once: the engine died."""
        log.error("stopping: %s", reason)
        self._state.draining = True
        self._grace_s = 0.0
        self._start_drain(reason, DEATH_LINGER_S)

    def _start_drain(self, reason: str, linger_s: float = 0.0) -> None:
        asyncio.ensure_future(self._drain(reason, linger_s))

    async def _drain(self, reason: str, linger_s: float) -> None:
        engine = self._state.engine
        log.info("%s: draining %d open requests for up to %g s", reason, engine.num_open_requests,
                 self._grace_s)
        await self._until_no_open_requests(self._grace_s)
        if engine.num_open_requests:
            log.warning("shutdown grace period over: ending %d open requests",
                        engine.num_open_requests)
            engine.end_all(EngineDead("the server shut down before the request finished"))
            await self._until_no_open_requests(ENDED_WRITE_S)
        await asyncio.sleep(linger_s)
        self.should_exit = True

    async def _until_no_open_requests(self, seconds: float) -> None:
        deadline = self._loop.time() + seconds
        while self._state.engine.num_open_requests and self._loop.time() < deadline:
            await asyncio.sleep(POLL_S)
