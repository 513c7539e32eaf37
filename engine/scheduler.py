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

The scheduler is the one owner of sequences' progress and of their blocks (the KV manager
sits behind it): `schedule` picks the step's sequences and advances what they have computed,
`expect_tokens` holds a place for each token drawn on the device, `update_from_output` puts the
tokens in, stops sequences (one rule for each reason) and frees them. The engine core
(engine/core.py) only orders these calls around the runner and the sampler.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from wattserve.engine.config import SchedulerConfig
from wattserve.engine.kv_cache import KVCacheManager
from wattserve.engine.request import FinishReason, TokenLogprob
from wattserve.engine.prompt_logprobs import scoring as prompt_scoring
from wattserve.engine.prompt_logprobs import wanted as wants_prompt_logprobs
from wattserve.engine.sequence import PLACEHOLDER, Sequence
from wattserve.engine.step_input import StepInput


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Tokens of the sequences admitted this step, and those of them found in the prefix cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    inputs: StepInput | None = None  # what the runner computes
    # One per token drawn this step, in row order: the sequence, the row of the step's logits
    # it draws from (n > 1 forks draw from their parent's) and where its token goes.
    samplers: list[Sequence] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class StepResult:
    """A launched step as the host reads it back."""
    tokens: list[int]  # one per ScheduledBatch.samplers
    logprobs: list[TokenLogprob | None]
    prompt_logprobs: list[list[TokenLogprob]]  # one per StepInput.prompt_scorings


@dataclass
class TakenToken:
    seq: Sequence
    position: int  # in the sequence's tokens
    token: int
    logprob: TokenLogprob | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 eos_token_ids: list[int]):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # n > 1: a request's other sequences, by its first one's id, until that one's prompt is
        # in the cache and they can share it.
        self._unforked: dict[int, list[Sequence]] = {}
        self.num_preemptions = 0
        self.token_budget = config.max_num_batched_tokens

    def add(self, seqs: list[Sequence]) -> None:
        """A request's sequences: the first one prefills, the others fork from it."""
        self.waiting.append(seqs[0])
        if len(seqs) > 1:
            self._unforked[seqs[0].seq_id] = list(seqs[1:])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- a step ------------------------------------------------------------------------
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
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            filling.update(self.kv.keys_filled(seq.seq_id, seq.token_ids, cached, cached + n))
        if batch.seqs:
            batch.inputs = self._step_input(batch)
            self._advance(batch)
        return batch

    def _step_input(self, batch: ScheduledBatch) -> StepInput:
        inputs = StepInput(token_ids=[], starts=[], num_new=[], tables=[], samples=[],
                           rings=[] if self.kv.uses_rings else None)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            if wants_prompt_logprobs(seq) and (s := prompt_scoring(seq, i, len(inputs.token_ids), start, n)):
                inputs.prompt_scorings.append(s)
            if seq.token_ids[start + n - 1] == PLACEHOLDER:  # only ever the last token
                inputs.ahead.append((len(inputs.token_ids) + n - 1, seq.ahead_row))
            inputs.token_ids.extend(seq.token_ids[start : start + n])
            inputs.starts.append(start)
            inputs.num_new.append(n)
            inputs.tables.append(self.kv.tables[seq.seq_id])
            inputs.samples.append(start + n == seq.num_tokens)
            if inputs.rings is not None:
                inputs.rings.append(self.kv.ring(seq.seq_id))
        return inputs

    def _advance(self, batch: ScheduledBatch) -> None:
        """The step's tokens count as computed from now on (the runner computes them before
        anything reads the cache again); sequences that reach their last token draw the next
        one, and n > 1 siblings fork from their first sequence's prompt."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:
                batch.rows.append(len(batch.samplers))
                batch.samplers.append(seq)
        for row, seq in enumerate(list(batch.samplers)):
            for child in self._fork_siblings(seq, batch.inputs):
                batch.samplers.append(child)
                batch.rows.append(row)

    def _fork_siblings(self, seq: Sequence, inputs: StepInput) -> list[Sequence]:
        """When the first sequence of an n > 1 request has its prompt in the cache, its
        siblings share those blocks instead of computing the prompt again; those without room
        prefill on their own."""
        siblings = self._unforked.pop(seq.seq_id, [])
        forked = []
        while siblings and self.kv.can_fork():
            child = siblings.pop(0)
            copy = self.kv.fork(seq.seq_id, child.seq_id, seq.prompt_len)
            if copy is not None:
                inputs.block_copies.append(copy)
            if self.kv.uses_rings:  # KIVI: the last blocks' tokens are in the ring
                inputs.ring_copies.append((self.kv.ring(seq.seq_id)[0], self.kv.ring(child.seq_id)[0]))
            child.num_computed_tokens = seq.prompt_len
            self.running.append(child)
            forked.append(child)
        self.waiting.extend(siblings)
        return forked

    def expect_tokens(self, batch: ScheduledBatch) -> None:
        """The step's tokens are drawn on the device: each holds its place as a PLACEHOLDER
        until update_from_output. A sequence this token brings to its length limit is done
        whatever the token is: it is scheduled no more, and finishes when the token is read."""
        for row, seq in enumerate(batch.samplers):
            batch.positions.append(seq.num_tokens)
            if seq.finish_reason is not None:
                continue  # ended by the token read while this step ran (engine/core.py): dropped
            seq.token_ids.append(PLACEHOLDER)
            seq.ahead_row = row
            if self._at_length_limit(seq, seq.num_tokens):
                self.running.remove(seq)

    def update_from_output(self, batch: ScheduledBatch, step: StepResult) -> list[TakenToken]:
        """Put a launched step's tokens in place of their placeholders, stop the sequences they
        end and free them. Returns the tokens taken, in row order; tokens of sequences that
        finished meanwhile (aborted, or stopped by the token before, with this step launched
        ahead of reading it) are dropped."""
        for scoring, scored in zip(batch.inputs.prompt_scorings, step.prompt_logprobs):
            batch.seqs[scoring.seq_index].prompt_logprobs.extend(scored)
        taken = []
        for seq, position, token, logprob in zip(batch.samplers, batch.positions, step.tokens, step.logprobs):
            if seq.finish_reason is not None:
                continue
            seq.token_ids[position] = token
            if seq.grammar is not None:  # its next mask follows this token (engine/structured)
                seq.grammar.accept_token(token)
            # Blocks waiting on this token (their last computed one was its placeholder) can be keyed now.
            self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            taken.append(TakenToken(seq, position, token, logprob))
            reason = self._stop_reason(seq, token, position + 1)
            if reason is not None:
                del seq.token_ids[position + 1 :]  # a step launched ahead may have added a placeholder
                self.finish(seq, reason)
        return taken

    def _stop_reason(self, seq: Sequence, token: int, num_tokens: int) -> FinishReason | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if self._at_length_limit(seq, num_tokens):
            return FinishReason.LENGTH
        return None

    def _at_length_limit(self, seq: Sequence, num_tokens: int) -> bool:
        return num_tokens - seq.prompt_len >= seq.max_tokens or num_tokens >= self.max_model_len

    # ---- blocks ------------------------------------------------------------------------
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
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is (a stop, an abort, a stop string the caller found) and
        free its blocks. A step launched ahead may still hold a token for it: finished, the
        token is dropped, even if a new request has taken its request id meanwhile."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._unforked.pop(seq.seq_id, None)
        self.kv.free(seq.seq_id)
