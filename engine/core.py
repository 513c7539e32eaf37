"""The synchronous engine: requests in, one `step()` at a time, outputs out. No threads, no HTTP."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from wattserve.engine.config import EngineConfig
from wattserve.engine.energy import EnergyMeter
from wattserve.engine.kv_cache import KVCacheManager
from wattserve.engine.loader import default_model_path, load_checkpoint
from wattserve.engine.request import (
    FinishReason, InvalidRequestError, RequestOutput, SamplingParams, SequenceOutput, TokenLogprob,
    check_request,
)
from wattserve.engine.gpu_timer import GpuSpan
from wattserve.engine.host_to_device import device_tensor
from wattserve.engine.sampler import SampledTokens, Sampler, reads_own_tokens
from wattserve.engine.prompt_logprobs import wanted as wants_prompt_logprobs
from wattserve.engine.scheduler import ScheduledBatch, Scheduler, StepResult
from wattserve.engine.sequence import Sequence
from wattserve.engine.slo import SLO
from wattserve.engine.stats import EngineStats, RequestStats, StatsObserver, StepStats
from wattserve.engine.structured.compiler import GrammarCompiler
from wattserve.engine.tp_runner import make_runner
from wattserve.engine.warmup import warm_up
from wattserve.kernels.kv_format import kv_format
from wattserve.kernels.weight_format import weight_bytes

log = logging.getLogger("wattserve.engine")


@dataclass
class _Launched:
    """A step running on the device, its tokens not yet read by the host."""

    batch: ScheduledBatch
    logits: torch.Tensor  # of the sequences that draw a token, until drawn
    gpu_span: GpuSpan | None
    prompt_logprobs: list[list[TokenLogprob]]  # see engine/prompt_logprobs.py
    begin: float  # time.monotonic() before a power cap's pause
    start: float  # ... after it
    sampled: SampledTokens | None = None  # once drawn (_draw)


@dataclass
class _Request:
    seqs: list[Sequence]
    prompt_len: int
    stats: RequestStats


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = _pick_device(config.device)
        ckpt = load_checkpoint(config.model, config.load_format, config.tokenizer,
                               sliced=config.tensor_parallel_size > 1)
        self.model_name = ckpt.name
        self.model_path = config.model or default_model_path()
        self.model_config = mc = ckpt.model_config
        self.tokenizer = ckpt.tokenizer
        self.dtype = _pick_dtype(config.dtype, self.device, mc.torch_dtype)
        max_len = min(config.scheduler.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        fmt = kv_format(config.cache.kv_cache_dtype)
        self.runner = make_runner(config, mc, self.dtype, self.device, max_len, fmt)
        self.runner.load(ckpt.weights, config.quantization, config.seed)
        cache = config.cache
        # int4 and int2 (KIVI) keep each running sequence's last blocks in full precision: one ring
        # each (forks beyond max_num_seqs wait for a free one, see Scheduler._fork_siblings).
        num_rings = config.scheduler.max_num_seqs if fmt.kivi else 0
        num_blocks = self.runner.num_blocks_for(cache, num_rings)
        capacity = num_blocks * cache.block_size
        if capacity < max_len:
            # Every sequence must fit in the cache alone, or preemption could loop forever.
            log.warning("KV cache holds %d tokens, less than the context length %d: capping it", capacity, max_len)
            max_len = capacity
        if max_len < 1:
            raise ValueError(f"the KV cache budget fits no block of {cache.block_size} tokens")
        self.max_model_len = max_len
        self.runner.allocate_kv_cache(num_blocks, cache.block_size, num_rings)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(config.scheduler.max_num_seqs, max_len)
        self.kv = KVCacheManager(num_blocks, cache.block_size, num_rings,
                                 enable_prefix_caching=cache.enable_prefix_caching, kv_cache_dtype=fmt.name,
                                 ring_blocks=max(1, fmt.ring_blocks))
        self.scheduler = Scheduler(config.scheduler, self.kv, max_len, self.tokenizer.eos_token_ids)
        self.sampler = Sampler(self.tokenizer.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer.hf, mc.vocab_size, self.tokenizer.eos_token_ids)
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
        (engine/core_loop.py): offline callers and the warm-up queue as much as they like.
        Outputs carry token ids; the caller detokenizes them and applies stop strings
        (engine/output_processor.py), calling `stop` when one matches."""
        check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        seqs = [Sequence(request_id, i, prompt_token_ids, params, max_tokens) for i in range(params.n)]
        if arrival_time is None:
            arrival_time = time.monotonic()
        stats = RequestStats(arrival_time, len(prompt_token_ids), slo)
        self.requests[request_id] = _Request(seqs, len(prompt_token_ids), stats)
        if params.structured is not None:
            self.grammars.add(seqs)  # scheduled once its grammar is compiled (_launch)
        else:
            self.scheduler.add(seqs)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.finish(seq, FinishReason.ABORT)
        self._finish(req.stats, FinishReason.ABORT, time.monotonic())

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)

    def stop(self, request_id: str, indices: list[int]) -> None:
        """The caller found a stop string in these sequences' text: they end as STOP (the
        request too, once all its sequences have ended)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for i in indices:
            self.scheduler.finish(req.seqs[i], FinishReason.STOP)
        if all(s.finish_reason is not None for s in req.seqs):
            del self.requests[request_id]
            self._finish(req.stats, FinishReason.STOP, time.monotonic())

    def num_queued(self) -> int:
        """Waiting requests beyond those the free sequence slots admit at the next step: a
        burst on an idle engine is not a queue."""
        free_slots = self.scheduler.config.max_num_seqs - len(self.scheduler.running)
        return max(0, len(self.scheduler.waiting) - free_slots)

    def close(self) -> None:
        """Stop the other ranks' processes under tensor parallelism (engine/tp_runner.py)."""
        self.runner.close()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None or self.grammars.has_waiting()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_total_blocks=self.kv.pool.num_blocks, num_free_blocks=self.kv.num_free_blocks,
        )

    # ---- a step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run a step; return the outputs of the oldest step not yet returned.

        Launching ahead (on by default on CUDA): the next step is scheduled and launched
        before this one's tokens are read, its inputs taken from this step's tokens on the
        device, so the GPU does not wait while the host checks stops and hands out outputs. A
        sequence that stops on this step's token has run one step more for nothing; that
        step's token is dropped. A step with a sequence whose draw reads its own last token (a
        grammar's mask, penalties) runs its forward pass ahead all the same and draws once that
        token is read: the host reads and fills masks while the GPU runs the forward pass."""
        if self._in_flight is None:
            launched = self._launch()
            if launched is None:
                if self.grammars.has_waiting():
                    self.grammars.wait(0.01)  # nothing to run but compiling grammars: don't spin
                return []
            self._draw(launched)
            self._in_flight = launched
        ahead = self._launch() if self.launch_ahead else None
        if ahead is not None and not any(reads_own_tokens(s) for s in ahead.batch.samplers):
            self._draw(ahead)
        outputs = self._resolve(self._in_flight)
        if ahead is not None and ahead.sampled is None:
            self._draw(ahead)
        self._in_flight = ahead
        return outputs

    def _launch(self) -> _Launched | None:
        """Schedule and run the model, without waiting for it."""
        begin = time.monotonic()
        if self.step_pause_s:
            time.sleep(self.step_pause_s)  # a power cap's pacing; see engine/power_cap.py
        start = time.monotonic()
        for seqs in self.grammars.ready():
            self.scheduler.add(seqs)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return None
        ahead_tokens = None if self._in_flight is None else self._in_flight.sampled.tokens
        out = self.runner.execute(batch.inputs, ahead_tokens)
        return _Launched(batch, out.logits, out.gpu_span, out.prompt_logprobs, begin, start)

    def _draw(self, launched: _Launched) -> None:
        """Draw the step's tokens on the device, without waiting for them."""
        batch, logits = launched.batch, launched.logits
        if len(batch.rows) > len(set(batch.rows)):  # forks: their parent's row again (indexing by a list would sync)
            logits = logits[device_tensor(batch.rows, torch.long, logits.device)]
        launched.sampled = self.sampler.sample(logits, batch.samplers)
        launched.logits = None
        self.scheduler.expect_tokens(batch)

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens, hand them to the scheduler and return the requests'
        outputs."""
        tokens, logprobs = launched.sampled.resolve()
        taken = self.scheduler.update_from_output(launched.batch,
                                                  StepResult(tokens, logprobs, launched.prompt_logprobs))
        by_request: dict[str, list[SequenceOutput]] = {}
        prompt_logprobs = {}
        for t in taken:
            seq = t.seq
            by_request.setdefault(seq.request_id, []).append(SequenceOutput(
                index=seq.index, token_ids=[t.token],
                logprobs=None if seq.params.logprobs is None else [t.logprob],
                finish_reason=seq.finish_reason, num_output_tokens=seq.num_output_tokens))
            if wants_prompt_logprobs(seq) and seq.index == 0 and t.position == seq.prompt_len:
                prompt_logprobs[seq.request_id] = [None, *seq.prompt_logprobs]  # sent with the first token
        self._record_step(launched, by_request)
        return [self._output(rid, outs, prompt_logprobs.get(rid)) for rid, outs in by_request.items()]

    def _record_step(self, launched: _Launched, sampled: dict[str, list[SequenceOutput]]) -> None:
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
        for request_id, outs in sampled.items():
            self.requests[request_id].stats.record_tokens(len(outs), end, step)
        for observer in self.observers:
            observer.on_step(step)

    def _finish(self, stats: RequestStats, reason: FinishReason, now: float) -> None:
        stats.finish_time, stats.finish_reason = now, reason
        for observer in self.observers:
            observer.on_finished(stats)

    def _output(self, request_id: str, outs: list[SequenceOutput],
                prompt_logprobs: list[TokenLogprob | None] | None) -> RequestOutput:
        req = self.requests[request_id]
        # A sequence finishes when its last token is read, which may be a step after the
        # scheduler stopped scheduling it: its length was known at launch.
        finished = all(s.finish_reason is not None for s in req.seqs)
        if finished:
            del self.requests[request_id]
            # n > 1 counts once, under its first choice's reason.
            self._finish(req.stats, req.seqs[0].finish_reason, req.stats.last_token_time)
        return RequestOutput(request_id, req.prompt_len, outs, finished, prompt_logprobs)


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
