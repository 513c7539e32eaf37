"""Server-Sent Events as OpenAI sends them: `data: <json>` per chunk, then `data: [DONE]`."""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from wattserve.engine.request import RequestOutput
from wattserve.server.errors import to_api_error
from wattserve.server.generation import Generation

DONE = "data: [DONE]\n\n"

# The OpenAPI entry of a route that streams with `stream: true`: its 200 is JSON or SSE.
SSE_RESPONSE = {200: {"content": {"text/event-stream": {
    "schema": {"type": "string", "description": "Server-Sent Events, one JSON object per "
                                                "`data:` line (see the JSON schema)."}}}}}


def event(chunk: BaseModel, include_usage: bool) -> str:
    # OpenAI's chunks carry "usage": null only when the client asked for usage.
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def stream_events(gen: Generation, head: Iterable[str],
                        chunks: Callable[[RequestOutput], Iterable[str]],
                        usage: Callable[[], str] | None) -> AsyncGenerator[str, None]:
    """`head` before the outputs, `chunks(output)` for each, then the `usage()` chunk where
    the client asked for one. An error once the stream has started can only be told in-band:
    an error event, then [DONE]."""
    async with aclosing(gen):
        for line in head:
            yield line
        try:
            async for out in gen:
                for line in chunks(out):
                    yield line
            if usage is not None:
                yield usage()
        except Exception as exc:
            yield f"data: {json.dumps(to_api_error(exc).body())}\n\n"
    yield DONE


def sse_response(events: AsyncGenerator[str, None]) -> StreamingResponse:
    # starlette stops iterating when the client disconnects; the background close then
    # reaches the engine even if the generator was suspended at a yield, not inside it.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(events.aclose))
