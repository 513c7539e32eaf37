"""The FastAPI app: routes, middleware, error handlers, and the engine's lifetime."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from wattserve.engine.power import PowerSource
from wattserve.server import errors
from wattserve.server.middleware import ApiKey, BodyLimit, RequestId
from wattserve.server.routes import chat, completions, models, ops
from wattserve.server.state import VERSION, ServerConfig, ServerState

log = logging.getLogger("wattserve.server")


def build_app(engine, config: ServerConfig, power_source: PowerSource | None = None) -> FastAPI:
    """`engine`: an AsyncEngine with its model loaded; the app starts its loop on startup
    and stops it on shutdown, after uvicorn has drained or cancelled in-flight requests.
    `power_source`: the engine's devices' power (engine/power_sources.py), for the power and
    energy metrics and --power-cap-watts; None: neither."""
    state = ServerState(engine, config, power_source)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start()  # power sampling first: the engine's first step reads a sample
        engine.start()
        try:
            yield
        finally:
            stats = engine.stats()
            log.info("stopping the engine (%d running, %d waiting requests are aborted)",
                     stats.num_running, stats.num_waiting)
            await engine.shutdown()
            state.close()

    app = FastAPI(title="wattserve", version=VERSION, lifespan=lifespan,
                  description="An OpenAI-compatible LLM inference server.")
    app.state.server = state
    for module in (chat, completions, models, ops):
        app.include_router(module.router)
    errors.install(app)
    # Added innermost first: RequestId sees every response, 401s included.
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(ApiKey, api_key=config.api_key)
    app.add_middleware(RequestId)
    return app
