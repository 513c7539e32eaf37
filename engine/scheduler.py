"""Iteration-level continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget. Running sequences are served first, oldest first: a decode
takes one token, an unfinished prefill takes the next chunk that fits. Then waiting
sequences are admitted in arrival order (FCFS: one that does not fit blocks those behind
it). When the KV cache cannot hold a running sequence's next tokens, the newest running
sequence is preempted: its blocks are freed and it waits at the front of the queue to be
recomputed (prompt and the tokens it already generated) later. Any single sequence fits in
the cache (the engine caps the context length to it), so this never deadlocks.

With prefix caching, an admitted sequence starts from the cached blocks of its longest
matching prefix and prefills only the rest (engine/kv_cache.py). A waiting sequence whose next
block is one this step computes for another sequence (a shared system prompt sent by many
clients at once) is admitted a step later, from the cache, instead of computing it again
beside it (SGLang's in-batch prefix check; BatchLLM groups sharers for the same reason). It
waits in FCFS order, so those behind it wait too.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from wattserve.engine.config import SchedulerConfig
from wattserve.engine.kv_cache import KVCacheManager
from wattserve.engine.request import SequenceStatus
from wattserve.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Tokens of the sequences admitted this step, and those of them found in the prefix cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.token_budget = config.max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV blocks are already in place (a fork of a running one)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.token_budget
        filling: set[bytes] = set()  # prefix-cache keys of the blocks this step fills
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, n, batch):
                break  # `seq` itself was the newest and got preempted
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            filling.update(self.kv.keys_filled(seq.seq_id, seq.token_ids, seq.num_computed_tokens,
                                               seq.num_computed_tokens + n))
            i += 1
        # Admitting while preempting would only thrash: the freed blocks go to the running.
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # A waiting sequence has no blocks; a preempted one looks up its generated tokens too.
            # Prompt logprobs need every prompt token computed: none come from the cache.
            found = [] if seq.params.prompt_logprobs is not None else self.kv.cached_prefix(seq.seq_id, seq.token_ids)
            reusable = self.kv.reusable_keys(seq.seq_id, seq.token_ids)
            if len(found) < len(reusable) and reusable[len(found)] in filling:
                break  # its next block is being computed: it takes it from the cache next step
            prefix = self.kv.prefix_to_reuse(found)
            cached = len(prefix) * self.kv.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.kv.can_admit(seq.seq_id, prefix, cached + n):
                break
            self.kv.allocate(seq.seq_id, cached + n, prefix)
            seq.num_computed_tokens = cached
            if self.kv.enable_prefix_caching:
                batch.prefix_cache_queries += seq.num_tokens
                batch.prefix_cache_hits += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            filling.update(self.kv.keys_filled(seq.seq_id, seq.token_ids, cached, cached + n))
        return batch

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Allocate blocks for `seq`'s next `n` tokens, preempting the newest running
        sequences until they fit. False when `seq` itself had to go."""
        total = seq.num_computed_tokens + n
        while not self.kv.can_allocate(self.kv.blocks_needed(seq.seq_id, total)):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        self.kv.allocate(seq.seq_id, total)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def stop(self, seq: Sequence) -> None:
        """Schedule a running sequence no more, keeping its blocks until finish(): its last
        token is drawn but not yet read back (engine/core.py)."""
        self.running.remove(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from wherever it is and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)
