"""Offline generation in this process: `LLM(...).generate(prompts, params)`, as vLLM's `LLM`.

For scripts, tests and benchmarks: it builds an EngineCore here (no server, no threads), adds
the prompts as requests, steps until they finish and returns each prompt's result in prompt
order. `llm.core` stays open for what needs engine internals (the runner, observers).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.output_processor import OutputProcessor
from wattserve.engine.request import FinishReason, RequestOutput, SamplingParams
from wattserve.engine.stats import RequestStats
from wattserve.engine.step_input import StepInput

Prompt = str | list[int]  # text is tokenized with the model's tokenizer, special tokens added


@dataclass
class Choice:
    """One of a prompt's n generated sequences."""

    index: int
    text: str = ""  # stop strings removed
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass
class Generation:
    """A prompt's result: its n choices and its request's timeline (stats.ttft, stats.tpot,
    time.monotonic() stamps of arrival, first token and finish)."""

    prompt_token_ids: list[int]
    choices: list[Choice]
    stats: RequestStats


class LLM:
    def __init__(self, model: str | EngineConfig | None = None, **options):
        """`LLM(EngineConfig(...))`, or `LLM(model, **options)` where options are fields of
        EngineConfig, CacheConfig or SchedulerConfig by name, e.g.
        `LLM(device="cpu", kv_cache_memory=64 << 20, max_num_seqs=16)`; model None: the default."""
        if isinstance(model, EngineConfig):
            if options:
                raise TypeError("pass an EngineConfig or options, not both")
            self.core = EngineCore(model)
        else:
            self.core = EngineCore(_engine_config(model, options))
        self._request_ids = itertools.count()  # unique over every generate() call
        self._outputs = OutputProcessor(self.core.tokenizer)

    def close(self) -> None:
        """Stop the engine's other processes (tensor parallelism's ranks); `with LLM(...)` does."""
        self.core.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Iterable[Prompt], params: SamplingParams | list[SamplingParams], *,
                 max_in_flight: int | None = None,
                 on_step: Callable[[list[RequestOutput]], bool | None] | None = None) -> list[Generation]:
        """One Generation per prompt, in prompt order; `params` is shared or one per prompt.

        max_in_flight: at most this many requests in the engine at once; each finished one
        lets the next prompt in (a closed loop; `prompts` is read lazily, so it may be endless
        when on_step ends the run).
        on_step: called after every step with that step's outputs (request ids are this
        LLM's own); returning True aborts the requests still running, their unfinished
        choices marked ABORT, and admits no more. For benchmarks that time phases or windows.
        """
        if isinstance(params, list):
            prompts = list(prompts)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
            pending = zip(prompts, params)
        else:
            pending = zip(prompts, itertools.repeat(params))
        results: list[Generation] = []
        running: dict[str, Generation] = {}
        try:
            self._admit(pending, results, running, max_in_flight)
            while self.core.has_work():  # a step launched ahead may remain after the last output
                outputs = self._outputs.process_all(self.core.step(), self.core.stop)
                for out in outputs:
                    _collect(running[out.request_id], out)
                    if out.finished:
                        del running[out.request_id]
                if on_step is not None and on_step(outputs):
                    self._abort(running)
                    pending, on_step = iter(()), None  # a step launched ahead may still run: not watched
                self._admit(pending, results, running, max_in_flight)
        except BaseException:
            self._abort(running)  # leave the engine empty for the next call
            raise
        for gen in running.values():  # aborted by on_step
            for choice in gen.choices:
                choice.finish_reason = choice.finish_reason or FinishReason.ABORT
        return results

    def _abort(self, running: dict[str, Generation]) -> None:
        for request_id in running:
            self._outputs.remove(request_id)
        self.core.abort_all()

    def _admit(self, pending, results: list[Generation], running: dict[str, Generation],
               max_in_flight: int | None) -> None:
        """Add prompts from `pending` while fewer than max_in_flight requests run."""
        while max_in_flight is None or len(running) < max_in_flight:
            item = next(pending, None)
            if item is None:
                return
            prompt, params = item
            ids = self.core.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = str(next(self._request_ids))
            self.core.add_request(rid, ids, params)
            self._outputs.add(rid, ids, params)
            gen = Generation(ids, [Choice(i) for i in range(params.n)], self.core.requests[rid].stats)
            results.append(gen)
            running[rid] = gen


def prompt_logits(core: EngineCore, prompt_ids: list[int]) -> torch.Tensor:
    """float32 logits [vocab] after the prompt's last token, through the engine's paged prefill
    and its KV cache: for checks against a reference implementation on the same weights."""
    seq_id = -1  # no Sequence's: theirs count up from 0
    core.kv.allocate(seq_id, len(prompt_ids))
    try:
        inputs = StepInput(token_ids=list(prompt_ids), starts=[0], num_new=[len(prompt_ids)],
                           tables=[core.kv.tables[seq_id]], samples=[True],
                           rings=[core.kv.ring(seq_id)] if core.kv.uses_rings else None)
        return core.runner.execute(inputs).logits[0].float()
    finally:
        core.kv.free(seq_id)


def _collect(gen: Generation, out: RequestOutput) -> None:
    for seq in out.outputs:
        choice = gen.choices[seq.index]
        choice.text += seq.text
        choice.token_ids += seq.token_ids
        choice.finish_reason = seq.finish_reason


def _engine_config(model: str | None, options: dict) -> EngineConfig:
    """Options split by the dataclass that has a field of their name; an unknown one raises
    EngineConfig's TypeError."""
    nested = {}
    for name, cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig)):
        names = {f.name for f in fields(cls)}
        nested[name] = cls(**{k: options.pop(k) for k in list(options) if k in names})
    return EngineConfig(model=model, **options, **nested)
