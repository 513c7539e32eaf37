"""Every error the API returns, in OpenAI's shape: `{"error": {message, type, param, code}}`.

Domain errors raised by the engine (InvalidRequestError, QueueFull, EngineDead, ...) are mapped
to HTTP here and nowhere else; the routes and the SSE stream both go through `to_api_error`.
"""
from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from wattserve.engine.request import ContextLengthExceeded, EngineDead, InvalidRequestError, QueueFull
from wattserve.server.protocol import ErrorResponse

log = logging.getLogger("wattserve.server")

# Seconds a client told "queue full" should wait; one engine step drains many requests, so a
# short constant beats an estimate that would itself need the scheduler's state.
RETRY_AFTER_S = 1


class APIError(HTTPException):
    """An error with OpenAI's fields. A starlette HTTPException, so FastAPI re-raises it
    unchanged when it happens while the body is read (the body size limit)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist.", param="model",
                    code="model_not_found")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


def timed_out(seconds: float) -> APIError:
    return APIError(408, f"The request did not finish within {seconds:g} s and was aborted.",
                    type="timeout_error", code="request_timeout")


def not_ready(reason: str) -> APIError:
    return APIError(503, f"The server is not ready: {reason}", type="server_error",
                    code="not_ready")


class ClientDisconnected(Exception):
    """The client went away; its engine request was aborted and nobody reads the answer.
    Answered with nginx's 499, for the access log only."""


def to_api_error(exc: Exception) -> APIError:
    """The one mapping from what can go wrong while serving a request to an HTTP error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFull):
        return APIError(429, f"The server is overloaded: {exc}. Retry later.",
                        type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDead):
        return not_ready(str(exc))
    if isinstance(exc, HTTPException):  # starlette's: unknown route, bad method, unparsable body
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers)
    log.error("internal error", exc_info=exc)
    return APIError(500, "Internal server error.", type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's complaint about the body as OpenAI's 400, naming the first offending field.
    The offending value is left out of the message: it may be huge or deeply nested."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error')}.")
    # A value matching no member of a union gets one error per member, each with the member's
    # name in its location ("content", "str"); the field is the part their locations share.
    same_field = [e for e in errors if tuple(e["loc"][:2]) == tuple(first["loc"][:2])]
    shared = os.path.commonprefix([list(e["loc"]) for e in same_field])  # any sequences work
    loc = [str(part) for part in shared]
    param = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or None
    if param is None:
        return APIError(400, "The body must be a JSON object sent with "
                             "'Content-Type: application/json'.")
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    deepest = max(same_field, key=lambda e: len(e["loc"]))  # the most specific complaint
    return APIError(400, f"Invalid value for '{param}': {deepest.get('msg')}.", param=param)


def install(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_disconnect(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_exception_handler(HTTPException, on_error)
    for domain_error in (InvalidRequestError, QueueFull, EngineDead):
        app.add_exception_handler(domain_error, on_error)
    app.add_exception_handler(Exception, on_error)


def documented(*statuses: int) -> dict:
    """OpenAPI entries for the error statuses a route can return."""
    return {status: {"model": ErrorResponse} for status in statuses}
