"""What the routes share: the engine, the server's settings, names, metrics."""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from wattserve.engine.energy import EnergyMeter
from wattserve.engine.power import PowerSampler, PowerSource
from wattserve.engine.power_cap import PowerCapController
from wattserve.engine.slo import SLO
from wattserve.server.errors import model_not_found, not_ready
from wattserve.server.metrics import Metrics

T = TypeVar("T")


def _version() -> str:
    try:
        return version("wattserve")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "0+unknown"


VERSION = _version()


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    served_model_names: list[str] | None = None  # None: the checkpoint's name
    request_timeout: float | None = None  # seconds; None: no limit
    max_request_bytes: int = 1 << 20
    shutdown_grace_seconds: float = 30.0
    log_level: str = "info"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    power_cap_watts: float | None = None
    power_sample_interval_ms: float = 100.0
    metrics_window_seconds: float = 60.0  # goodput, attainment, energy per token

    def default_slo(self) -> SLO | None:
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        return SLO(ttft_s=None if self.slo_ttft_ms is None else self.slo_ttft_ms / 1e3,
                   tpot_s=None if self.slo_tpot_ms is None else self.slo_tpot_ms / 1e3)


class ServerState:
    def __init__(self, engine, config: ServerConfig, power_source: PowerSource | None = None):
        """`power_source`: where the engine's devices' power is read; None: no power metrics."""
        self.engine = engine
        self.config = config
        self.model_names = config.served_model_names or [engine.core.model_name]
        self.slo = config.default_slo()
        self.power = None if power_source is None else PowerSampler(
            power_source, config.power_sample_interval_ms / 1e3)
        power_cap = self._attach_power(engine.core, config.power_cap_watts)
        self.metrics = Metrics(engine, self.model_names[0], config.metrics_window_seconds,
                               self.slo, self.power, power_cap,
                               gpu_timed=engine.core.runner.gpu_timer.enabled)
        engine.core.observers.append(self.metrics)
        self.created = int(time.time())
        # Changes when anything that changes outputs for a fixed seed changes.
        identity = f"{VERSION}|{engine.core.model_name}|{engine.core.dtype}|{engine.core.device}"
        self.fingerprint = "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]
        # Tokenizing a long prompt must not stall the event loop (and every stream with it);
        # one thread is enough, more would only take CPU from the engine thread.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="wattserve-tokenize")

    def _attach_power(self, core, cap_w: float | None) -> PowerCapController | None:
        """Price the engine's steps in joules and, given a cap, throttle it under the cap."""
        if self.power is None:
            if cap_w is not None:
                raise ValueError("--power-cap-watts needs power readings, and there are none "
                                 "here (the log says why)")
            return None
        core.energy_meter = EnergyMeter(self.power)
        if cap_w is None:
            return None
        power = self.power
        cap = PowerCapController(core, lambda: power.snapshot.average_power_w, cap_w)
        core.observers.append(cap)
        return cap

    def ready_engine(self):
        if not self.engine.is_alive:
            raise not_ready("the engine is not running")
        return self.engine

    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise model_not_found(requested)
        return requested

    async def tokenize(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def start(self) -> None:
        if self.power is not None:
            self.power.start()

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        if self.power is not None:
            self.power.stop()


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]  # what a route declares to receive it
