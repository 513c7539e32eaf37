"""The FastAPI app: routes, middleware, error handlers, and the engine's lifetime."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from wattserve.engine.client import EngineClient
from wattserve.server import errors
from wattserve.server.middleware import ApiKey, BodyLimit, RequestId
from wattserve.server.routes import chat, completions, models, ops, responses, tokenize
from wattserve.server.state import VERSION, ServerConfig, ServerState

log = logging.getLogger("wattserve.server")


def build_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """`engine`: a client whose engine has its model loaded; the app starts it on startup and
    stops it on shutdown, after the drain (server/drain.py) has finished or ended every
    request."""
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            stats = engine.snapshot().stats
            log.info("stopping the engine (%d running, %d waiting requests are aborted)",
                     stats.num_running, stats.num_waiting)
            await engine.shutdown()
            state.close()

    app = FastAPI(title="wattserve", version=VERSION, lifespan=lifespan,
                  description="An OpenAI-compatible LLM inference server.")
    app.state.server = state
    for module in (chat, completions, models, ops, responses, tokenize):
        app.include_router(module.router)
    errors.install(app)
    # Added innermost first: RequestId sees every response, 401s included.
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(ApiKey, api_key=config.api_key)
    app.add_middleware(RequestId)
    return app
