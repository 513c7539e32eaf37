"""MPClient: the engine core in its own process (engine/core_process.py), so the HTTP event
loop and the engine loop never share a GIL.

Requests and aborts go out on a PUSH socket; a task on the event loop reads the core's
messages, each carrying one step's outputs for all its requests, and hands them to their
streams in one pass. The process's sentinel is watched on the event loop too: if the core
exits unasked (a CUDA error, out of memory, a kill), every open request ends with EngineDead
at once and `on_death` tells the server to stop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import shutil
import tempfile
from typing import Callable

import zmq
import zmq.asyncio

from wattserve.engine.client import EngineClient, EngineInfo, EngineSnapshot
from wattserve.engine.config import EngineConfig, MonitorConfig
from wattserve.engine.core_process import run_core_process
from wattserve.engine.request import EngineDead
from wattserve.engine.stats import StatsObserver, StepStats
from wattserve.engine.tokenizer import Tokenizer

log = logging.getLogger("wattserve.engine")


class EngineStartError(RuntimeError):
    """The core process could not load the model (the message says why)."""


class MPClient(EngineClient):
    def __init__(self, info: EngineInfo, tokenizer: Tokenizer, snapshot: EngineSnapshot,
                 process: multiprocessing.Process, context: zmq.Context, to_core: zmq.Socket,
                 from_core: zmq.Socket, socket_dir: str):
        super().__init__(info, tokenizer)
        self._process = process
        self._context = context
        self._to_core = to_core
        self._from_core = from_core
        self._socket_dir = socket_dir
        self._observers: list[StatsObserver] = []
        self._snapshot = snapshot
        self._reader: asyncio.Task | None = None
        self._stopping = False
        self.on_death: Callable[[], None] = lambda: None  # the server's exit, set by it

    @classmethod
    def launch(cls, config: EngineConfig, monitor: MonitorConfig = MonitorConfig(),
               log_level: str = "info") -> MPClient:
        """Start the core process and wait until its model is loaded. Raises the loader's
        error (ModelLoadError, UnsupportedModelError, ValueError) if it could not."""
        socket_dir = tempfile.mkdtemp(prefix="wattserve-")  # mode 0700: this user's sockets
        context = zmq.Context()
        to_core, from_core = context.socket(zmq.PUSH), context.socket(zmq.PULL)
        to_core.bind(f"ipc://{socket_dir}/input")
        from_core.bind(f"ipc://{socket_dir}/output")
        # spawn, not fork: CUDA cannot start in a forked child, and the child need not carry
        # the front end's state.
        process = multiprocessing.get_context("spawn").Process(
            target=run_core_process, name="wattserve-engine", daemon=True,
            args=(config, monitor, f"ipc://{socket_dir}/input", f"ipc://{socket_dir}/output",
                  log_level))
        process.start()
        log.info("engine core process started (pid %d); loading the model", process.pid)
        try:
            while not from_core.poll(200):
                if not process.is_alive():
                    raise EngineStartError(f"the engine process exited with code {process.exitcode}")
            kind, *payload = pickle.loads(from_core.recv())
            if kind == "failed":
                raise payload[0]
            return cls(*payload, process, context, to_core, from_core, socket_dir)
        except BaseException:
            process.kill()
            process.join()
            context.destroy(linger=0)
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = asyncio.create_task(self._read(zmq.asyncio.Socket.from_socket(self._from_core)))
        loop.add_reader(self._process.sentinel, self._on_exit)
        self._started = True

    async def shutdown(self) -> None:
        self._stopping = True
        if self._process.is_alive():
            # Not blocking: a core exiting meanwhile (it died and is cleaning up) leaves the
            # socket no peer to queue for, and a blocking send would wait forever.
            with contextlib.suppress(zmq.Again):
                self._send(("shutdown",), zmq.NOBLOCK)
            await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            log.warning("the engine process did not stop in 30 s: killing it")
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        if self._reader is not None:
            self._reader.cancel()
            asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._context.destroy(linger=0)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def add_observer(self, observer: StatsObserver) -> None:
        self._observers.append(observer)

    # ---- messages ----------------------------------------------------------------------
    def _send(self, message: tuple, flags: int = 0) -> None:
        self._to_core.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), flags)

    async def _read(self, from_core: zmq.asyncio.Socket) -> None:
        while True:
            kind, *body = pickle.loads(await from_core.recv())
            if kind == "step":
                outputs, errors, events, self._snapshot = body
                self._observe(events)
                self._deliver(outputs, errors)
            elif kind == "idle":
                self._snapshot = body[0]
            elif kind == "died":
                self._engine_died(body[0])

    def _observe(self, events: list) -> None:
        for event in events:
            for observer in self._observers:
                if isinstance(event, StepStats):
                    observer.on_step(event)
                else:
                    observer.on_finished(event)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if not self._stopping:
            self._process.join()
            self._engine_died(f"the engine process exited with code {self._process.exitcode}")

    def _engine_died(self, reason: str) -> None:
        if self._error is None:
            log.error("%s: ending every open request", reason)
            self._die(EngineDead(reason))
            self.on_death()

