"""Endpoints for operators and probes: liveness, readiness, version, Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from wattserve.server.errors import documented, not_ready
from wattserve.server.state import VERSION, State

router = APIRouter()


@router.get("/health", responses=documented(503))
async def health(state: State):
    """Liveness: the process answers, and its engine process, once started, has not died
    (only a restart brings it back). 503 with status "draining" while a SIGTERM drains the
    open requests. Never needs an API key."""
    if state.engine.started and not state.engine.is_alive:
        raise not_ready(str(state.engine.error or "the engine has stopped"))
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", responses=documented(503))
async def ready(state: State) -> dict:
    """Readiness: the model is loaded and the engine loop is running."""
    state.ready_engine()
    return {"status": "ready"}


@router.get("/version")
async def get_version() -> dict:
    return {"version": VERSION}


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
