"""Pure ASGI middleware: request ids and access log, API key, body size limit.

Pure ASGI rather than BaseHTTPMiddleware, which would buffer streamed responses and hide
client disconnects from the routes.
"""
from __future__ import annotations

import hmac
import logging
import time
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wattserve.server.errors import body_too_large, unauthorized

log = logging.getLogger("wattserve.access")


class RequestId:
    """Gives every request a fresh id (X-Request-Id on the response, the prefix of completion
    ids, the key in logs). A client's X-Request-Id is not reused: engine ids must be unique."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.monotonic(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %s -> %s in %.3f s", request_id, scope["method"], scope["path"],
                     status or "no response", time.monotonic() - started)


class ApiKey:
    """Requires `Authorization: Bearer <key>` on /v1 routes (the scheme in any case, as
    RFC 7235 has it); health, readiness and metrics stay open for probes and scrapers."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer"
                    and hmac.compare_digest(key.strip().encode(), self._expected)):
                return await unauthorized().response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over `limit` bytes: at once from Content-Length, else while reading
    (chunked uploads), before the body is held in memory."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        # Digits counted first: int() refuses strings of more than 4300 of them.
        if declared.isdigit() and (len(declared) > 19 or int(declared) > self.limit):
            return await body_too_large(self.limit).response()(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise body_too_large(self.limit)  # an HTTPException: FastAPI lets it through
            return message

        await self.app(scope, limited_receive, send)
