"""The engine core's own process: loads the model, then runs the core loop on its main thread
(a second thread would share the GIL with whatever else runs), taking messages from the
front end over one ZeroMQ socket and sending back, over another, each step's outputs for all
its requests in one message, with the step's stats and the engine's state for the gauges.

Messages are pickled tuples: both ends are this package, on one machine, over ipc sockets in
a directory only this user can open. Outgoing ones:
    ("ready", EngineInfo, Tokenizer, EngineSnapshot) | ("failed", exception): once, after
        loading (the tokenizer pickled: loading it again from a GGUF file takes seconds)
    ("step", outputs, errors, stats_events, EngineSnapshot): a step (or refused requests)
    ("idle", EngineSnapshot): every IDLE_PUBLISH_S while nothing runs, so gauges stay live
    ("died", message): the loop raised; the process exits 1 after sending it
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import time

import zmq

from wattserve.engine.config import EngineConfig, MonitorConfig
from wattserve.engine.core_loop import Message, run_core_loop
from wattserve.engine.request import RequestOutput
from wattserve.engine.stats import RequestStats, StatsObserver, StepStats

log = logging.getLogger("wattserve.engine")
IDLE_PUBLISH_S = 0.5


class StatsRelay(StatsObserver):
    """Keeps the core's stats events, in order, for the next message to the front end."""

    def __init__(self):
        self.events: list[StepStats | RequestStats] = []

    def on_step(self, step: StepStats) -> None:
        self.events.append(step)

    def on_finished(self, request: RequestStats) -> None:
        self.events.append(request)

    def take(self) -> list[StepStats | RequestStats]:
        events, self.events = self.events, []
        return events


def run_core_process(config: EngineConfig, monitor_config: MonitorConfig, input_address: str,
                     output_address: str, log_level: str) -> None:
    """The process's target (multiprocessing, spawned)."""
    # Ctrl-C reaches the whole process group; the front end decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_address)

    def send(*message) -> None:
        outbox.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        from wattserve.engine.core import EngineCore  # torch, and maybe CUDA, in this process only
        from wattserve.engine.monitor import CoreMonitor
        from wattserve.engine.power_sources import open_power_source

        core = EngineCore(config)
        monitor = CoreMonitor(core, monitor_config, open_power_source(core.device))
    except Exception as exc:
        send("failed", _picklable(exc))
        outbox.close(linger=5000)  # deliver it before the process exits
        sys.exit(1)
    relay = StatsRelay()
    core.observers.append(relay)
    monitor.start()
    send("ready", monitor.info(), core.tokenizer, monitor.snapshot())
    parent = os.getppid()
    last_sent = time.monotonic()

    def next_message(block: bool) -> Message | None:
        if not inbox.poll(IDLE_PUBLISH_S * 1000 if block else 0):
            return None
        return pickle.loads(inbox.recv())

    def publish(outputs: list[RequestOutput], errors: dict[str, Exception]) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if outputs or errors or relay.events:
            send("step", outputs, errors, relay.take(), monitor.snapshot())
        elif now - last_sent >= IDLE_PUBLISH_S:
            if os.getppid() != parent:  # the front end died without telling us: nobody to serve
                os._exit(0)
            send("idle", monitor.snapshot())
        else:
            return
        last_sent = now

    try:
        run_core_loop(core, next_message, publish)
    except BaseException as exc:
        log.exception("engine loop failed")
        send("died", f"engine loop failed: {exc}")
        outbox.close(linger=5000)
        sys.exit(1)
    finally:
        monitor.stop()
        core.close()
    outbox.close(linger=5000)


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(str(exc))
