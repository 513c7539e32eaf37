"""Several Generations answered as one: /v1/completions with a list of prompts.

Choices are numbered across prompts, `prompt * choices_per_prompt + choice`, as OpenAI and
vLLM number them. Every prompt's engine request runs from the start; their outputs are
handed on prompt by prompt (a later prompt's wait in their queues meanwhile).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import replace

from wattserve.engine.request import RequestOutput
from wattserve.server.generation import Generation, SequenceResult
from wattserve.server.protocol import Usage


class GenerationGroup:
    def __init__(self, gens: list[Generation], choices_per_prompt: int):
        self.gens = gens
        self._per_prompt = choices_per_prompt
        self._current = 0

    @classmethod
    async def start(cls, starts: list[Awaitable[tuple[Generation, dict]]],
                    choices_per_prompt: int) -> tuple[GenerationGroup, dict]:
        """Awaits routes/common.py's `start` for every prompt at once; if one fails, the
        others are closed (aborted) and its error raised. Returns the group and the header."""
        started = await asyncio.gather(*starts, return_exceptions=True)
        failed = [s for s in started if isinstance(s, BaseException)]
        if failed:
            for result in started:
                if not isinstance(result, BaseException):
                    await result[0].aclose()
            raise failed[0]
        return cls([gen for gen, _ in started], choices_per_prompt), started[0][1]

    def __aiter__(self) -> GenerationGroup:
        return self

    async def __anext__(self) -> RequestOutput:
        while self._current < len(self.gens):
            try:
                out = await anext(self.gens[self._current])
            except StopAsyncIteration:
                self._current += 1
                continue
            base = self._current * self._per_prompt
            return replace(out, outputs=[replace(s, index=base + s.index) for s in out.outputs])
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for gen in self.gens:
            await gen.aclose()

    async def collect(self) -> list[list[SequenceResult]]:
        """Each prompt's choices, in order, numbered within their prompt."""
        return [await gen.collect() for gen in self.gens]

    @property
    def prompt_tokens(self) -> int:
        return sum(gen.prompt_tokens for gen in self.gens)

    def usage(self) -> Usage:
        completion = sum(gen.completion_tokens for gen in self.gens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)
