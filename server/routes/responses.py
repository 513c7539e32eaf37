"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API, answered by the
chat path (server/responses_chat.py translates), streamed as its typed event sequence."""
from __future__ import annotations

import itertools
import json
from contextlib import aclosing

from fastapi import APIRouter, Request

from wattserve.engine.request import InvalidRequestError
from wattserve.server.errors import APIError, documented, to_api_error
from wattserve.server.generation import Generation, until_disconnect
from wattserve.server.response_store import StoredResponse
from wattserve.server.responses_chat import RESPONSES_NAMES, chat_request, turn_messages
from wattserve.server.responses_protocol import (
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from wattserve.server.routes.chat import start_chat
from wattserve.server.state import ServerState, State
from wattserve.server.streaming import SSE_RESPONSE, sse_response

router = APIRouter()


def _not_found(param: str | None, response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param,
                    code="not_found")


@router.post("/v1/responses", response_model=ResponseObject,
             responses={**documented(400, 401, 404, 408, 413, 429, 503), **SSE_RESPONSE})
async def create_response(body: ResponsesRequest, request: Request, state: State):
    """A model response; with `stream: true`, Server-Sent Events of typed response events."""
    state.unknown_fields.note(request.url.path, body)
    history: list[dict] = []
    if body.previous_response_id is not None:
        previous = state.responses.get(body.previous_response_id)
        if previous is None:
            raise _not_found("previous_response_id", body.previous_response_id)
        history = previous.messages
    conversation = history + turn_messages(body)
    try:
        gen, header, params, _ = await start_chat(request, state, chat_request(body, conversation),
                                                  "resp")
    except InvalidRequestError as exc:
        exc.param = RESPONSES_NAMES.get(exc.param, exc.param)
        raise
    answer = _Answer(state, body, header, params, conversation, request.state.request_id)
    if body.stream:
        return sse_response(_events(gen, answer))
    async with aclosing(gen):
        results = await until_disconnect(request, gen.collect())
    return answer.finish(results[0].text, results[0].finish_reason, gen)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject,
            responses=documented(401, 404))
async def get_response(response_id: str, state: State):
    stored = state.responses.get(response_id)
    if stored is None:
        raise _not_found(None, response_id)
    return stored.response


class _Answer:
    """The response object of one request, from created to completed; stored when asked."""

    def __init__(self, state: ServerState, body: ResponsesRequest, header: dict, params,
                 conversation: list[dict], request_id: str):
        self._state, self._body, self._conversation = state, body, conversation
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        fmt = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {}
        self._fields = dict(
            id=self.id, created_at=header["created"], model=header["model"],
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            previous_response_id=body.previous_response_id, store=body.store,
            temperature=params.temperature, top_p=params.top_p, tools=body.tools or [],
            tool_choice=body.tool_choice or "auto", text={"format": {"type": "text"}, **fmt},
            metadata=body.metadata or {}, user=body.user)

    def in_progress(self) -> ResponseObject:
        return ResponseObject(**self._fields, status="in_progress", output=[])

    def message(self, text: str, status: str) -> OutputMessage:
        content = [OutputText(text=text)] if status != "in_progress" else []
        return OutputMessage(id=self.item_id, status=status, content=content)

    def finish(self, text: str, finish_reason: str | None, gen: Generation) -> ResponseObject:
        incomplete = finish_reason == "length"
        usage = gen.usage()
        response = ResponseObject(
            **self._fields, status="incomplete" if incomplete else "completed",
            output=[self.message(text, "incomplete" if incomplete else "completed")],
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete
            else None,
            usage=ResponseUsage(input_tokens=usage.prompt_tokens,
                                output_tokens=usage.completion_tokens,
                                total_tokens=usage.total_tokens))
        if self._body.store:
            self._state.responses.put(self.id, StoredResponse(
                response.model_dump(mode="json"),
                self._conversation + [{"role": "assistant", "content": text}]))
        return response


async def _events(gen: Generation, answer: _Answer):
    """OpenAI's event sequence for one message of output_text, each event numbered."""
    numbers = itertools.count()

    def event(kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": next(numbers), **{
            k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v
            for k, v in fields.items()}}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    at = {"item_id": answer.item_id, "output_index": 0}
    part = OutputText(text="")
    async with aclosing(gen):
        yield event("response.created", response=answer.in_progress())
        yield event("response.in_progress", response=answer.in_progress())
        yield event("response.output_item.added", output_index=0,
                    item=answer.message("", "in_progress"))
        yield event("response.content_part.added", **at, content_index=0, part=part)
        text, finish_reason = "", None
        try:
            async for out in gen:
                for seq in out.outputs:
                    if seq.text:
                        text += seq.text
                        yield event("response.output_text.delta", **at, content_index=0,
                                    delta=seq.text, logprobs=[])
                    if seq.finish_reason is not None:
                        finish_reason = seq.finish_reason.value
        except Exception as exc:
            error = to_api_error(exc)
            yield event("error", code=error.code, message=error.message, param=error.param)
            return
        final = answer.finish(text, finish_reason, gen)
        yield event("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", **at, content_index=0,
                    part=OutputText(text=text))
        yield event("response.output_item.done", output_index=0, item=final.output[0])
        # A response cut short by max_output_tokens ends as OpenAI ends it: "incomplete".
        yield event(f"response.{final.status}", response=final)
