"""The synchronous engine: requests in, one `step()` at a time, outputs out. No threads, no HTTP."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from wattserve.engine.config import EngineConfig
from wattserve.engine.detokenizer import IncrementalDetokenizer
from wattserve.engine.energy import EnergyMeter
from wattserve.engine.kv_cache import KVCacheManager
from wattserve.engine.loader import default_model_path, load_checkpoint
from wattserve.engine.model_runner import ModelRunner
from wattserve.engine.request import (
    FinishReason, InvalidRequestError, RequestOutput, SamplingParams, SequenceOutput,
    check_request,
)
from wattserve.engine.gpu_timer import GpuSpan
from wattserve.engine.host_to_device import device_tensor
from wattserve.engine.sampler import SampledTokens, Sampler, reads_own_tokens
from wattserve.engine.scheduler import ScheduledBatch, Scheduler
from wattserve.engine.sequence import PLACEHOLDER, Sequence
from wattserve.engine.slo import SLO
from wattserve.engine.stats import EngineStats, RequestStats, StatsObserver, StepStats
from wattserve.engine.warmup import warm_up
from wattserve.engine.weight_loading import load_weights
from wattserve.kernels.kv_format import kv_format
from wattserve.kernels.weight_format import weight_bytes

log = logging.getLogger("wattserve.engine")


@dataclass
class _Launched:
    """A step running on the device, its tokens not yet read by the host."""

    batch: ScheduledBatch
    samplers: list[Sequence]  # one per drawn token, in row order
    positions: list[int]  # where each one's token goes in its token_ids (now a PLACEHOLDER)
    sampled: SampledTokens
    gpu_span: GpuSpan | None
    begin: float  # time.monotonic() before a power cap's pause
    start: float  # ... after it


@dataclass
class _Request:
    seqs: list[Sequence]
    prompt_len: int
    unforked: list[Sequence]  # n > 1: siblings waiting to share seqs[0]'s prefilled prompt
    stats: RequestStats


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = _pick_device(config.device)
        ckpt = load_checkpoint(config.model, config.load_format, config.tokenizer)
        self.model_name = ckpt.name
        self.model_path = config.model or default_model_path()
        self.model_config = mc = ckpt.model_config
        self.tokenizer = ckpt.tokenizer
        self.dtype = _pick_dtype(config.dtype, self.device, mc.torch_dtype)
        max_len = min(config.scheduler.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        fmt = kv_format(config.cache.kv_cache_dtype)
        self.runner = ModelRunner(mc, self.dtype, self.device, max_len, fmt)
        load_weights(self.runner.model, ckpt.weights, config.quantization, self.device, config.seed)
        cache = config.cache
        # int4 and int2 (KIVI) keep each running sequence's partial block in full precision: one slot each
        # (forks beyond max_num_seqs wait for a free one, see _fork_siblings).
        num_residual = config.scheduler.max_num_seqs if fmt.kivi else 0
        num_blocks = self.runner.num_blocks_for(cache, num_residual)
        capacity = num_blocks * cache.block_size
        if capacity < max_len:
            # Every sequence must fit in the cache alone, or preemption could loop forever.
            log.warning("KV cache holds %d tokens, less than the context length %d: capping it", capacity, max_len)
            max_len = capacity
        if max_len < 1:
            raise ValueError(f"the KV cache budget fits no block of {cache.block_size} tokens")
        self.max_model_len = max_len
        self.runner.allocate_kv_cache(num_blocks, cache.block_size, num_residual)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(config.scheduler.max_num_seqs, max_len)
        self.kv = KVCacheManager(num_blocks, cache.block_size, num_residual,
                                 enable_prefix_caching=cache.enable_prefix_caching, kv_cache_dtype=fmt.name,
                                 ring_blocks=max(1, fmt.residual_blocks))
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.sampler = Sampler(self.tokenizer.eos_token_ids)
        self.max_queue_len = config.scheduler.max_queue_len
        self.requests: dict[str, _Request] = {}
        # Monitoring, attached by the server or a benchmark: observers see every step and
        # finished request; the meter prices steps in joules; a power cap sets the pause.
        self.observers: list[StatsObserver] = []
        self.energy_meter: EnergyMeter | None = None
        self.step_pause_s = 0.0
        self.launch_ahead = _launch_ahead(config.launch_ahead, self.device)
        self._in_flight: _Launched | None = None
        self._last_step_end = 0.0
        log.info(
            "model %s | %s on %s | weights %.1f MiB | KV cache %s: %d blocks x %d tokens = %d tokens (%.1f MiB)"
            " | context %d | prefix caching %s",
            self.model_name, str(self.dtype).removeprefix("torch."), self.device,
            weight_bytes(self.runner.model) / 2**20, fmt.name, num_blocks,
            cache.block_size, capacity, num_blocks * self.runner.bytes_per_block(cache.block_size) / 2**20,
            max_len, "on" if cache.enable_prefix_caching else "off",
        )
        if config.warm_up:
            log.info("warm-up took %.2f s", warm_up(self))

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, slo: SLO | None = None) -> None:
        """`arrival_time`: time.monotonic() when the request reached the server, if earlier.
        Raises InvalidRequestError. The queue limit is the serving loop's to apply
        (engine/core_loop.py): offline callers and the warm-up queue as much as they like."""
        check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        seqs = [
            Sequence(request_id, i, prompt_token_ids, params, max_tokens,
                     IncrementalDetokenizer(self.tokenizer.hf, prompt_token_ids, params.stop))
            for i in range(params.n)
        ]
        if arrival_time is None:
            arrival_time = time.monotonic()
        stats = RequestStats(arrival_time, len(prompt_token_ids), slo)
        self.requests[request_id] = _Request(seqs, len(prompt_token_ids), seqs[1:], stats)
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if seq not in req.unforked:  # finish() frees a stopped sequence's blocks too
                self.scheduler.finish(seq)
            # A step launched ahead may still hold a token for it: marked, the token is
            # dropped, even if a new request has taken the id meanwhile.
            seq.finish_reason = seq.finish_reason or FinishReason.ABORT
        self._finish(req.stats, FinishReason.ABORT, time.monotonic())

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)

    def num_queued(self) -> int:
        """Waiting requests beyond those the free sequence slots admit at the next step: a
        burst on an idle engine is not a queue."""
        free_slots = self.scheduler.config.max_num_seqs - len(self.scheduler.running)
        return max(0, len(self.scheduler.waiting) - free_slots)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_total_blocks=self.kv.pool.num_blocks, num_free_blocks=self.kv.num_free_blocks,
            block_size=self.kv.block_size, num_preemptions=self.scheduler.num_preemptions,
            kv_cache_tokens=self.kv.pool.num_blocks * self.kv.block_size,
        )

    # ---- a step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run a step; return the outputs of the oldest step not yet returned.

        Launching ahead (on by default on CUDA): the next step is scheduled and launched
        before this one's tokens are read, its inputs taken from this step's tokens on the
        device, so the GPU does not wait while the host detokenizes, checks stops and hands
        out outputs. A sequence that stops on this step's token has run one step more for
        nothing; that step's token is dropped."""
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                return []
        ahead = self._launch() if self._can_launch_ahead(self._in_flight) else None
        outputs = self._resolve(self._in_flight)
        self._in_flight = ahead
        return outputs

    def _can_launch_ahead(self, launched: _Launched) -> bool:
        return self.launch_ahead and not any(reads_own_tokens(s) for s in launched.samplers)

    def _launch(self) -> _Launched | None:
        """Schedule and run a step and draw its tokens, without waiting for them: each
        sampling sequence gets a PLACEHOLDER token (see _resolve)."""
        begin = time.monotonic()
        if self.step_pause_s:
            time.sleep(self.step_pause_s)  # a power cap's pacing; see engine/power_cap.py
        start = time.monotonic()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return None
        tables = [self.kv.tables[s.seq_id] for s in batch.seqs]
        residual = [self.kv.residual(s.seq_id) for s in batch.seqs] if self.kv.uses_residual else None
        ahead_tokens = None if self._in_flight is None else self._in_flight.sampled.tokens
        logits = self.runner.execute(batch.seqs, batch.num_new_tokens, tables, residual, ahead_tokens)
        samplers = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:
                samplers.append(seq)
        # Each sampling sequence owns one logits row, in batch order; forks reuse their parent's.
        rows = list(range(len(samplers)))
        for i, seq in enumerate(samplers[: len(rows)]):
            for child in self._fork_siblings(seq):
                samplers.append(child)
                rows.append(i)
        if len(rows) > len(set(rows)):  # forks: their parent's row again (indexing by a list would sync)
            logits = logits[device_tensor(rows, torch.long, logits.device)]
        sampled = self.sampler.sample(logits, samplers)
        positions = []
        for row, seq in enumerate(samplers):
            positions.append(seq.num_tokens)
            seq.token_ids.append(PLACEHOLDER)
            seq.ahead_row = row
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                # Its last token: whatever it is, the sequence is done, so it must not be
                # scheduled again; _resolve finishes it.
                self.scheduler.stop(seq)
        return _Launched(batch, samplers, positions, sampled, self.runner.last_gpu_span, begin, start)

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens, put them in place of its placeholders, detokenize,
        check stops, and return the requests' outputs."""
        tokens, logprobs = launched.sampled.resolve()
        sampled: dict[str, int] = {}  # request id -> tokens sampled this step
        for seq, position, tok, lp in zip(launched.samplers, launched.positions, tokens, logprobs):
            if seq.finish_reason is not None:
                continue  # aborted, or stopped by the previous step's token: this one ran ahead for nothing
            self._append_token(seq, position, tok, lp)
            sampled[seq.request_id] = sampled.get(seq.request_id, 0) + 1
        self._record_step(launched, sampled)
        return [self._output(rid) for rid in sampled if rid in self.requests]

    def _record_step(self, launched: _Launched, sampled: dict[str, int]) -> None:
        end = time.monotonic()
        # Steps launched ahead overlap in wall time: each counts from where the one before it
        # ended, so step times (and energies) add up to the wall time, never more. The pause
        # before a step is part of its cost: the GPU idled so that it could stay under the cap.
        begin, start = max(launched.begin, self._last_step_end), max(launched.start, self._last_step_end)
        self._last_step_end = end
        energy = None if self.energy_meter is None else self.energy_meter.step_energy(begin, end)
        batch = launched.batch
        step = StepStats(start, end, sum(batch.num_new_tokens),
                         num_preemptions=len(batch.preempted), energy_j=energy,
                         gpu_busy_s=None if launched.gpu_span is None else launched.gpu_span.seconds(),
                         prefix_cache_queries=batch.prefix_cache_queries, prefix_cache_hits=batch.prefix_cache_hits)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            req = self.requests.get(seq.request_id)
            if req is None or all(s is not seq for s in req.seqs):
                continue  # aborted or finished while the step ran; its id may be a new request's
            if req.stats.scheduled_time is None:
                req.stats.scheduled_time = launched.start
            if energy is not None:  # split by tokens processed: see engine/energy.py
                req.stats.energy_j += energy * n / step.num_scheduled_tokens
        for request_id, n in sampled.items():
            self.requests[request_id].stats.record_tokens(n, end, step)
        for observer in self.observers:
            observer.on_step(step)

    def _finish(self, stats: RequestStats, reason: FinishReason, now: float) -> None:
        stats.finish_time, stats.finish_reason = now, reason
        for observer in self.observers:
            observer.on_finished(stats)

    def _fork_siblings(self, seq: Sequence) -> list[Sequence]:
        """When the first sequence of an n > 1 request has its prompt in the cache, its
        siblings share those blocks instead of computing the prompt again."""
        req = self.requests.get(seq.request_id)
        if req is None or not req.unforked or seq.index != 0:
            return []
        forked = []
        while req.unforked and self.kv.can_fork():
            child = req.unforked.pop(0)
            copy = self.kv.fork(seq.seq_id, child.seq_id, req.prompt_len)
            if copy is not None:
                self.runner.copy_block(*copy)
            if self.kv.uses_residual:  # KIVI: the last blocks' tokens are in the residual ring
                self.runner.copy_residual(self.kv.residual_slots[seq.seq_id], self.kv.residual_slots[child.seq_id])
            child.num_computed_tokens = req.prompt_len
            self.scheduler.add_running(child)
            forked.append(child)
        for child in req.unforked:  # no room to fork: they prefill on their own
            self.scheduler.add(child)
        req.unforked.clear()
        return forked

    def _append_token(self, seq: Sequence, position: int, token: int, logprob) -> None:
        """The token drawn for `position` of the sequence (its placeholder until now)."""
        seq.token_ids[position] = token
        # Blocks waiting on this token (their last computed one was its placeholder) can be keyed now.
        self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        seq.pending_token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        p = seq.params
        seq.detokenizer.add(token)
        reason = None
        if (token in self.tokenizer.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids or seq.detokenizer.stopped_by is not None:
            reason = FinishReason.STOP
        elif position + 1 - seq.prompt_len >= seq.max_tokens or position + 1 >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            seq.finish_reason = reason
            del seq.token_ids[position + 1 :]  # a step launched ahead may have added a placeholder
            self.scheduler.finish(seq)

    def _output(self, request_id: str) -> RequestOutput:
        req = self.requests[request_id]
        outs = []
        for seq in req.seqs:
            if not seq.pending_token_ids:
                continue
            text = seq.detokenizer.take(final=seq.finish_reason is not None)
            outs.append(SequenceOutput(
                index=seq.index, text=text, token_ids=seq.pending_token_ids,
                logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, num_output_tokens=seq.num_output_tokens,
            ))
            seq.pending_token_ids, seq.pending_logprobs = [], []
        # A sequence finishes when its last token is read (finish_reason), which may be a step
        # after the scheduler let it go (is_finished): its length was known at launch.
        finished = all(s.finish_reason is not None for s in req.seqs)
        if finished:
            del self.requests[request_id]
            # n > 1 counts once, under its first choice's reason.
            self._finish(req.stats, req.seqs[0].finish_reason, req.stats.last_token_time)
        return RequestOutput(request_id, req.prompt_len, outs, finished)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _launch_ahead(setting: str, device: torch.device) -> bool:
    """auto: on CUDA, where it hides the host's work behind the GPU's; on CPU the host is the
    device, so launching ahead would only delay each output by a step."""
    return device.type == "cuda" if setting == "auto" else setting == "on"


def _pick_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    if name != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls are slow or missing on most CPUs
    if checkpoint_dtype in ("float16", "bfloat16"):
        return getattr(torch, checkpoint_dtype)
    return torch.bfloat16
