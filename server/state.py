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

from server.errors import model_not_found, not_ready
from server.metrics import Metrics

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


class ServerState:
    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.model_names = config.served_model_names or [engine.core.model_name]
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        # Changes when anything that changes outputs for a fixed seed changes.
        identity = f"{VERSION}|{engine.core.model_name}|{engine.core.dtype}|{engine.core.device}"
        self.fingerprint = "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]
        # Tokenizing a long prompt must not stall the event loop (and every stream with it);
        # one thread is enough, more would only take CPU from the engine thread.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="wattserve-tokenize")

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

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]  # what a route declares to receive it
