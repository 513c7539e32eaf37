"""The engine core stepped on a thread of this process: for tests that hand the engine a fake
power source. Serving uses MPClient: a second Python thread shares the GIL with the HTTP
event loop, which slowed batch-1 decode on CPU from ~32 to ~19 tokens/s.

Requests and aborts cross into the thread through a queue; outputs cross back with
`loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading

from wattserve.engine.client import EngineClient, EngineSnapshot
from wattserve.engine.config import EngineConfig, MonitorConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.monitor import CoreMonitor
from wattserve.engine.core_loop import Message, run_core_loop
from wattserve.engine.power import PowerSource
from wattserve.engine.request import EngineDead, RequestOutput
from wattserve.engine.stats import StatsObserver

log = logging.getLogger("wattserve.engine")


class InprocClient(EngineClient):
    def __init__(self, core: EngineCore, monitor: CoreMonitor):
        super().__init__(monitor.info(), core.tokenizer)
        self.core = core
        self._monitor = monitor
        self._inbox: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, monitor: MonitorConfig = MonitorConfig(),
                    power_source: PowerSource | None = None) -> InprocClient:
        core = EngineCore(config)
        return cls(core, CoreMonitor(core, monitor, power_source))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._monitor.start()
        self._thread = threading.Thread(target=self._run, name="wattserve-engine", daemon=True)
        self._thread.start()
        self._started = True

    async def shutdown(self) -> None:
        self._send(("shutdown",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._monitor.stop()

    def snapshot(self) -> EngineSnapshot:
        return self._monitor.snapshot()

    def add_observer(self, observer: StatsObserver) -> None:
        self.core.observers.append(observer)

    def _send(self, message: Message) -> None:
        self._inbox.put(message)

    # ---- the engine thread -------------------------------------------------------------
    def _next_message(self, block: bool) -> Message | None:
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return None

    def _publish(self, outputs: list[RequestOutput], errors: dict[str, Exception]) -> None:
        if outputs or errors:
            self._loop.call_soon_threadsafe(self._deliver, outputs, errors)

    def _run(self) -> None:
        try:
            run_core_loop(self.core, self._next_message, self._publish)
        except BaseException as exc:  # the loop died: fail every open request, not hang it
            log.exception("engine loop failed")
            self._loop.call_soon_threadsafe(self._die, EngineDead(f"engine loop failed: {exc}"))
