"""One engine request as a route sees it: admitted, bounded in time, aborted when abandoned.

`Generation.start` waits for the first output before any response is sent, so a bad
parameter, a full queue or a dead engine become an HTTP status rather than an event inside a
200 stream. Every wait on the engine is bounded by the request's deadline, and every way out
(finished, timed out, client gone, closed early) ends in closing the engine's iterator, which
aborts the request in the engine and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from wattserve.engine.request import (
    RequestOutput,
    SamplingParams,
    SequenceOutput,
    TokenLogprob,
)
from wattserve.engine.slo import SLO
from wattserve.server.errors import ClientDisconnected, timed_out
from wattserve.server.protocol import Usage

log = logging.getLogger("wattserve.server")
T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first. Only for waits before a
    response starts: once streaming, starlette itself watches for the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class SequenceResult:
    """One choice, accumulated for a non-streamed answer."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, seq: SequenceOutput) -> None:
        self.text += seq.text
        self.logprobs += seq.logprobs or []
        if seq.finish_reason is not None:
            self.finish_reason = seq.finish_reason.value


class Generation:
    """An async iterator over the request's RequestOutput deltas, the first one included."""

    def __init__(self, request_id: str, prompt_ids: list[int],
                 outputs: AsyncIterator[RequestOutput], first: RequestOutput,
                 timeout: float | None, deadline: float | None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.prompt_tokens = first.prompt_tokens
        # Asked for (SamplingParams.prompt_logprobs): the engine sends them with the first output.
        self.prompt_logprobs = first.prompt_logprobs
        self._outputs = outputs
        self._next: RequestOutput | None = first
        self._timeout, self._deadline = timeout, deadline
        self._output_tokens: dict[int, int] = {}
        self._finished = False
        self._started = time.monotonic()

    @classmethod
    async def start(cls, engine, request: Request, request_id: str, prompt_ids: list[int],
                    params: SamplingParams, *, timeout: float | None, slo: SLO | None
                    ) -> Generation:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        outputs = engine.generate(request_id, prompt_ids, params, slo)
        first = await until_disconnect(request, _within(anext(outputs), deadline, timeout))
        return cls(request_id, prompt_ids, outputs, first, timeout, deadline)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._next is not None:
            out, self._next = self._next, None
        elif self._finished:
            raise StopAsyncIteration
        else:
            out = await _within(anext(self._outputs), self._deadline, self._timeout)
        for seq in out.outputs:
            self._output_tokens[seq.index] = seq.num_output_tokens
        if out.finished:
            self._finished = True
            log.info("%s finished: %d prompt + %d completion tokens in %.2f s", self.request_id,
                     self.prompt_tokens, self.completion_tokens,
                     time.monotonic() - self._started)
        return out

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            log.info("%s aborted after %d completion tokens", self.request_id,
                     self.completion_tokens)
        await self._outputs.aclose()

    async def collect(self) -> list[SequenceResult]:
        results: dict[int, SequenceResult] = {}
        async for out in self:
            for seq in out.outputs:
                results.setdefault(seq.index, SequenceResult(seq.index)).add(seq)
        return [results[i] for i in sorted(results)]

    @property
    def completion_tokens(self) -> int:
        return sum(self._output_tokens.values())

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


async def _within(step: Awaitable[T], deadline: float | None, timeout: float | None) -> T:
    # A timeout cancels the engine iterator mid-await, which aborts the request there.
    try:
        async with asyncio.timeout_at(deadline):
            return await step
    except TimeoutError:
        raise timed_out(timeout) from None
