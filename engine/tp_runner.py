"""The ranks of tensor parallelism (`--tensor-parallel-size N`): one process per rank.

Rank 0 is the engine core's own process (scheduler, sampler); its ShardedRunner starts ranks
1..N-1 as worker processes. Each step it sends every worker the step's plan (the StepInput,
pickled over a pipe) and runs its own shard; the workers run theirs, and the collectives of
the model (engine/tensor_parallel.py) join them: NCCL on CUDA, gloo on CPU. The block tables
in the plan are rank 0's, so every rank's share of the paged KV cache is laid out alike.

Plans travel over pipes rather than a collective so that an idle worker can wait for the next
step without a timeout, and so that either side learns of the other's death: a worker exits
at its pipe's end of file when rank 0 dies however it dies, and rank 0, whose collective
fails when a worker dies (gloo at once; NCCL at the process group's timeout), names the dead
rank in the error that takes the engine down (engine/core_process.py sends it to the front
end, which ends every request with it).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from wattserve.engine.config import EngineConfig, ModelConfig
from wattserve.engine.loader import load_checkpoint
from wattserve.engine.model_runner import ModelRunner
from wattserve.engine.step_input import StepInput, StepOutput
from wattserve.engine.tensor_parallel import Shard, check_splits
from wattserve.kernels.kv_format import KVFormat, kv_format

log = logging.getLogger("wattserve.engine")

# A collective waits this long for a rank that does not come: long enough for the slowest
# rank's first step (kernel compiles on every rank at once), short enough to end a hang.
COLLECTIVE_TIMEOUT_S = 300


class TensorParallelError(RuntimeError):
    """A rank other than 0 failed or exited; the message names it."""


def make_runner(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, fmt: KVFormat) -> ModelRunner:
    if config.tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, not {config.tensor_parallel_size}")
    if config.tensor_parallel_size == 1:
        return ModelRunner(model_config, dtype, device, max_positions, fmt)
    check_splits(model_config, config.tensor_parallel_size)  # before any process starts
    return ShardedRunner(config, model_config, dtype, device, max_positions, fmt)


class ShardedRunner(ModelRunner):
    """Rank 0's runner: what it does to its shard, it first tells the other ranks to do."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                 device: torch.device, max_positions: int, fmt: KVFormat):
        size = config.tensor_parallel_size
        if dist.is_initialized():  # torch.distributed has one default group per process
            raise RuntimeError("this process already runs a tensor-parallel engine: close it first")
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off; the workers inherit it
        self._store_dir = tempfile.mkdtemp(prefix="wattserve-tp-")
        store = os.path.join(self._store_dir, "store")
        self.workers: list[_Worker] = []
        self._closed = False
        self._threads = torch.get_num_threads()  # join_group shares the cores out on CPU; restored at close
        try:
            self.workers = [_Worker(rank, (rank, size, store, config, model_config, dtype, device, max_positions))
                            for rank in range(1, size)]
            for worker in self.workers:  # a rank that cannot start would leave the others waiting
                worker.wait_for("started", "starting")
            shard, self._control = join_group(0, size, store, device, model_config.vocab_size)
            super().__init__(model_config, dtype, device, max_positions, fmt, shard)
        except BaseException:
            self.close()
            raise
        log.info("tensor parallel: %d ranks over %s, worker pids %s", size, dist.get_backend(),
                 [w.process.pid for w in self.workers])

    def load(self, weights, quantization: str, seed: int) -> None:
        """Rank 0's slices, then wait until every worker has loaded its own."""
        try:
            super().load(weights, quantization, seed)
            for worker in self.workers:
                worker.wait_for("ready", "loading the model")
        except BaseException:
            self.close()
            raise

    def num_blocks_for(self, cache, num_rings: int = 0) -> int:
        """The fewest any rank has room for: every rank holds the same blocks."""
        with self._failures():
            self._send("num_blocks_for", cache, num_rings)
            return agree_min(super().num_blocks_for(cache, num_rings), self._control)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_rings: int = 0) -> None:
        self._send("allocate_kv_cache", num_blocks, block_size, num_rings)
        super().allocate_kv_cache(num_blocks, block_size, num_rings)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        with self._failures():
            self._send("capture_decode_graphs", max_num_seqs, max_model_len)
            super().capture_decode_graphs(max_num_seqs, max_model_len)

    def execute(self, inputs: StepInput, ahead_tokens: torch.Tensor | None = None) -> StepOutput:
        """The tokens `inputs.ahead` reads are on rank 0's device only: broadcast to the others."""
        ahead = (ahead_tokens.numel(), ahead_tokens.dtype) if inputs.ahead else None
        with self._failures():
            self._send("execute", inputs, ahead)
            if ahead is not None:
                ahead_tokens = ahead_tokens.contiguous()
                dist.broadcast(ahead_tokens, 0, group=self.shard.group)
            return super().execute(inputs, ahead_tokens)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self.workers:
            worker.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads)
        shutil.rmtree(self._store_dir, ignore_errors=True)

    def _send(self, *command) -> None:
        for worker in self.workers:
            worker.conn.send(command)

    @contextlib.contextmanager
    def _failures(self):
        """A failed collective or pipe where a worker died: an error that names the rank."""
        try:
            yield
        except (RuntimeError, OSError) as exc:
            dead = [w for w in self.workers if w.exited(wait_s=2.0)]
            if not dead:
                raise
            w = dead[0]
            raise TensorParallelError(f"tensor-parallel rank {w.rank} (pid {w.process.pid}) exited with code "
                                      f"{w.process.exitcode}{w.last_words()}; the engine cannot run without it") from exc


class _Worker:
    """Rank 0's handle on one worker process."""

    def __init__(self, rank: int, args: tuple):
        self.rank = rank
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot start in a forked child
        self.conn, child_end = ctx.Pipe()
        # The engine core process is a daemon of the front end (engine/mp_client.py), and
        # multiprocessing refuses children to daemons lest they be orphaned; these die with
        # it: they are daemons themselves, and exit at their pipe's end of file if it is killed.
        current = multiprocessing.current_process()
        daemon, current.daemon = current.daemon, False
        try:
            self.process = ctx.Process(target=run_worker, args=(*args, child_end, logging.getLogger().level),
                                       name=f"wattserve-tp{rank}", daemon=True)
            self.process.start()
        finally:
            current.daemon = daemon
        child_end.close()

    def wait_for(self, message: str, doing: str) -> None:
        while not self.conn.poll(0.2):
            if not self.process.is_alive():
                raise TensorParallelError(f"tensor-parallel rank {self.rank} exited with code "
                                          f"{self.process.exitcode} while {doing}")
        kind, *body = self.conn.recv()
        if kind == "failed":
            raise TensorParallelError(f"tensor-parallel rank {self.rank} failed {doing}: {body[0]}")
        assert kind == message, (kind, message)

    def last_words(self) -> str:
        """The error a worker sent before it exited, if any."""
        with contextlib.suppress(OSError, EOFError):
            if self.conn.poll():
                kind, *body = self.conn.recv()
                if kind == "failed":
                    return f" ({body[0]})"
        return ""

    def exited(self, wait_s: float) -> bool:
        self.process.join(wait_s)
        return not self.process.is_alive()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("shutdown",))
        self.process.join(10)
        if self.process.is_alive():
            log.warning("tensor-parallel rank %d did not stop in 10 s: killing it", self.rank)
            self.process.kill()
            self.process.join()
        self.conn.close()


def join_group(rank: int, size: int, store: str, device: torch.device, vocab_size: int) -> tuple[Shard, object]:
    """Join the ranks' process group -> (this rank's Shard, a gloo group for host values)."""
    device = rank_device(device, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the host's cores; more threads than cores spin against each other
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    # Connects every pair now (NCCL builds its communicator on the first collective, which
    # must not happen inside a CUDA graph capture) and fails here if a rank cannot be reached.
    dist.all_reduce(torch.zeros(1, device=device))
    return Shard(rank, size, vocab_size, dist.group.WORLD), control


def agree_min(value: int, control) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control)
    return int(t.item())


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r on the r-th GPU from the one asked for; on CPU, all on the host."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def run_worker(rank: int, size: int, store: str, config: EngineConfig, model_config: ModelConfig,
               dtype: torch.dtype, device: torch.device, max_positions: int, conn, log_level: int) -> None:
    """A worker process's target: load this rank's shard, then run what rank 0 sends until it
    says stop or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when the engine stops
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[tp{rank}]: %(message)s")
    conn.send(("started",))
    try:
        shard, control = join_group(rank, size, store, device, model_config.vocab_size)
        device = rank_device(device, rank)
        runner = ModelRunner(model_config, dtype, device, max_positions, kv_format(config.cache.kv_cache_dtype),
                             shard)
        ckpt = load_checkpoint(config.model, config.load_format, with_tokenizer=False, sliced=True)
        runner.load(ckpt.weights, config.quantization, config.seed)
    except Exception as exc:
        log.exception("loading failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    try:
        _serve(runner, control, conn)
    except Exception as exc:  # rank 0's collective fails too: it reports this, then stops
        log.exception("step failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    finally:
        dist.destroy_process_group()


def _serve(runner: ModelRunner, control, conn) -> None:
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:  # rank 0 is gone
            return
        if command == "shutdown":
            return
        if command == "execute":
            inputs, ahead = args
            ahead_tokens = None
            if ahead is not None:
                ahead_tokens = torch.empty(ahead[0], dtype=ahead[1], device=runner.device)
                dist.broadcast(ahead_tokens, 0, group=runner.shard.group)
            runner.execute(inputs, ahead_tokens)
        elif command == "num_blocks_for":
            agree_min(runner.num_blocks_for(*args), control)
        else:  # allocate_kv_cache, capture_decode_graphs
            getattr(runner, command)(*args)
