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

from wattserve.engine.client import EngineClient
from wattserve.engine.slo import SLO
from wattserve.server.errors import model_not_found, not_ready
from wattserve.server.metrics import Metrics
from wattserve.server.response_store import ResponseStore
from wattserve.server.tool_parsers import ToolParser, parser_for
from wattserve.server.unknown_fields import UnknownFieldLog

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
    responses_store_size: int = 1000
    shutdown_grace_seconds: float = 30.0
    log_level: str = "info"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    metrics_window_seconds: float = 60.0  # goodput, attainment, energy per token
    tool_call_parser: str | None = None  # None: the format the chat template shows, if any

    def default_slo(self) -> SLO | None:
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        return SLO(ttft_s=None if self.slo_ttft_ms is None else self.slo_ttft_ms / 1e3,
                   tpot_s=None if self.slo_tpot_ms is None else self.slo_tpot_ms / 1e3)


class ServerState:
    def __init__(self, engine: EngineClient, config: ServerConfig):
        self.engine = engine
        self.config = config
        info = engine.info
        self.model_names = config.served_model_names or [info.model_name]
        self.slo = config.default_slo()
        # A client whose engine never started has no tokenizer, so no template to read.
        template = None if engine.tokenizer is None else engine.tokenizer.chat_template
        self.tool_parser: ToolParser | None = parser_for(
            config.tool_call_parser, template.source if template is not None else None)
        self.metrics = Metrics(engine.snapshot, info, self.model_names[0],
                               config.metrics_window_seconds, self.slo)
        engine.add_observer(self.metrics)
        self.created = int(time.time())
        self.unknown_fields = UnknownFieldLog()
        self.responses = ResponseStore(config.responses_store_size)
        self.draining = False  # SIGTERM: finish what runs, refuse what comes (server/drain.py)
        # Changes when anything that changes outputs for a fixed seed changes.
        identity = f"{VERSION}|{info.model_name}|{info.dtype}|{info.device}"
        self.fingerprint = "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]
        # Tokenizing a long prompt must not stall the event loop (and every stream with it).
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="wattserve-tokenize")

    def ready_engine(self) -> EngineClient:
        if self.draining:
            raise not_ready("it is shutting down")
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

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]  # what a route declares to receive it
