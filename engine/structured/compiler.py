"""Grammars compiled on a background thread of the core process, cached by constraint, and the
requests waiting for theirs.

Compiling a JSON Schema against the tokenizer takes milliseconds to seconds (it grows with the
vocabulary and the schema), so it never runs inside a step: a constrained request waits here,
out of the scheduler's queue, until its grammar is ready, while the step loop serves the rest.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait

from wattserve.engine.sequence import Sequence
from wattserve.engine.structured.spec import OutputConstraint

log = logging.getLogger("wattserve.engine")

# Compiled grammars kept, least recently used dropped first: a JSON Schema's takes ~75 kB
# (SmolLM2's tokenizer, 128k-wide logits), so at most ~20 MB.
_CACHE_SIZE = 256


class GrammarCompiler:
    """Owns the compiled grammars and the sequences whose grammar is still compiling."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="wattserve-grammar")
        # The tokenizer's token table takes ~0.3 s (49k tokens) to build: on the thread, and
        # only once a request asks for a grammar, so start-up does not pay for it.
        self._compiler: Future | None = None
        self._tokenizer = (hf_tokenizer, vocab_size, stop_token_ids)
        self._compiled: OrderedDict[OutputConstraint, Future] = OrderedDict()
        self._waiting: list[tuple[list[Sequence], Future]] = []  # a request's sequences, first to be scheduled
        self.compile_seconds: dict[OutputConstraint, float] = {}  # each compile's time on the thread

    def compile(self, constraint: OutputConstraint) -> Future:
        """The compiled grammar (an xgrammar CompiledGrammar), at once if cached."""
        future = self._compiled.get(constraint)
        if future is None:
            if self._compiler is None:
                self._compiler = self._thread.submit(_make_compiler, *self._tokenizer)
            future = self._compiled[constraint] = self._thread.submit(self._compile, constraint)
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(constraint)
        return future

    def _compile(self, constraint: OutputConstraint):
        start = time.perf_counter()
        compiled = self._compiler.result().compile_grammar(constraint.grammar())
        self.compile_seconds[constraint] = time.perf_counter() - start
        return compiled

    def add(self, seqs: list[Sequence]) -> None:
        """A constrained request's sequences; `ready()` hands them back once compiled."""
        self._waiting.append((seqs, self.compile(seqs[0].params.structured)))

    def ready(self) -> list[list[Sequence]]:
        """The sequences of each request whose grammar is now compiled, in arrival order,
        every sequence given its own matcher."""
        import xgrammar as xgr

        ready, still = [], []
        for seqs, future in self._waiting:
            if not future.done():
                still.append((seqs, future))
                continue
            for seq in seqs:
                if seq.finish_reason is None:  # else aborted while it compiled
                    seq.grammar = xgr.GrammarMatcher(future.result())
            if seqs[0].finish_reason is None:
                ready.append(seqs)
        self._waiting = still
        return ready

    def has_waiting(self) -> bool:
        return bool(self._waiting)

    def wait(self, timeout: float) -> None:
        """Sleep until a waiting grammar is compiled or `timeout` s pass: an engine with nothing
        else to do should not spin."""
        wait([future for _, future in self._waiting], timeout, return_when="FIRST_COMPLETED")


def _make_compiler(hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
    import xgrammar as xgr

    # The logits may be wider than the tokenizer (padded embeddings): those ids are never allowed.
    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=stop_token_ids or None)
    # Our own cache keys on the constraint; xgrammar's would key the same grammars again. A
    # quarter of the cores: the step loop and the front end need the rest.
    threads = max(1, (os.cpu_count() or 1) // 4)
    return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
