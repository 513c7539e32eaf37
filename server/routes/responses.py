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
    FunctionCallOutput,
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
from wattserve.server.tool_calls import ToolCallReader, ToolPlan, assemble

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
        gen, header, params, plan = await start_chat(request, state, chat_request(body, conversation),
                                                     "resp")
    except InvalidRequestError as exc:
        exc.param = RESPONSES_NAMES.get(exc.param, exc.param)
        raise
    answer = _Answer(state, body, header, params, plan, conversation, request.state.request_id)
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
                 plan: ToolPlan, conversation: list[dict], request_id: str):
        self._state, self._body, self._conversation = state, body, conversation
        self.plan = plan
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        self._request_id = request_id
        fmt = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {}
        self._fields = dict(
            id=self.id, created_at=header["created"], model=header["model"],
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            previous_response_id=body.previous_response_id, store=body.store,
            temperature=params.temperature, top_p=params.top_p, tools=body.tools or [],
            tool_choice=body.tool_choice or "auto", text={"format": {"type": "text"}, **fmt},
            metadata=body.metadata or {}, user=body.user)

    @property
    def reads_tool_calls(self) -> bool:
        return self.plan.mode is not None

    def in_progress(self) -> ResponseObject:
        return ResponseObject(**self._fields, status="in_progress", output=[])

    def message(self, text: str, status: str) -> OutputMessage:
        content = [OutputText(text=text)] if status != "in_progress" else []
        return OutputMessage(id=self.item_id, status=status, content=content)

    def _output(self, text: str, status: str) -> tuple[list[OutputMessage | FunctionCallOutput], dict]:
        """The output items of the generated text and the assistant turn to store: a message,
        or with tools the calls read from the text (after a message with any text besides)."""
        if not self.reads_tool_calls:
            return [self.message(text, status)], {"role": "assistant", "content": text}
        reader = ToolCallReader(self.plan)
        content, calls = assemble(reader.feed(text) + reader.finish())
        items: list[OutputMessage | FunctionCallOutput] = []
        if content or not calls:
            items.append(self.message(content or "", status))
        items += [FunctionCallOutput(id=f"fc_{self._request_id}_{i}", call_id=call.id,
                                     name=call.function.name, arguments=call.function.arguments)
                  for i, call in enumerate(calls or [])]
        turn = {"role": "assistant", "content": content}
        if calls:
            turn["tool_calls"] = [call.model_dump() for call in calls]
        return items, turn

    def finish(self, text: str, finish_reason: str | None, gen: Generation) -> ResponseObject:
        incomplete = finish_reason == "length"
        usage = gen.usage()
        output, turn = self._output(text, "incomplete" if incomplete else "completed")
        response = ResponseObject(
            **self._fields, status="incomplete" if incomplete else "completed", output=output,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete
            else None,
            usage=ResponseUsage(input_tokens=usage.prompt_tokens,
                                output_tokens=usage.completion_tokens,
                                total_tokens=usage.total_tokens))
        if self._body.store:
            self._state.responses.put(self.id, StoredResponse(
                response.model_dump(mode="json"), self._conversation + [turn]))
        return response


async def _events(gen: Generation, answer: _Answer):
    """OpenAI's event sequence, each event numbered: the message's output_text streamed as it
    is generated; with tools, whose calls are told from text only once read, every output item
    once the answer is whole."""
    numbers = itertools.count()

    def event(kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": next(numbers), **{
            k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v
            for k, v in fields.items()}}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    streamed = not answer.reads_tool_calls
    at = {"item_id": answer.item_id, "output_index": 0}
    async with aclosing(gen):
        yield event("response.created", response=answer.in_progress())
        yield event("response.in_progress", response=answer.in_progress())
        if streamed:
            for e in _message_opened(event, answer.message("", "in_progress"), 0):
                yield e
        text, finish_reason = "", None
        try:
            async for out in gen:
                for seq in out.outputs:
                    if seq.text:
                        text += seq.text
                        if streamed:
                            yield event("response.output_text.delta", **at, content_index=0,
                                        delta=seq.text, logprobs=[])
                    if seq.finish_reason is not None:
                        finish_reason = seq.finish_reason.value
        except Exception as exc:
            error = to_api_error(exc)
            yield event("error", code=error.code, message=error.message, param=error.param)
            return
        final = answer.finish(text, finish_reason, gen)
        for index, item in enumerate(final.output):
            for e in _item_closed(event, item, index, opened=streamed):
                yield e
        # A response cut short by max_output_tokens ends as OpenAI ends it: "incomplete".
        yield event(f"response.{final.status}", response=final)


def _message_opened(event, message: OutputMessage, index: int):
    yield event("response.output_item.added", output_index=index, item=message)
    yield event("response.content_part.added", item_id=message.id, output_index=index,
                content_index=0, part=OutputText(text=""))


def _item_closed(event, item: OutputMessage | FunctionCallOutput, index: int, opened: bool):
    """The events that end an output item; those that open it too where it was not streamed
    (`opened`: its added events and text deltas were sent as it was generated)."""
    at = {"item_id": item.id, "output_index": index}
    if isinstance(item, FunctionCallOutput):
        yield event("response.output_item.added", output_index=index, item=item)
        yield event("response.function_call_arguments.delta", **at, delta=item.arguments)
        yield event("response.function_call_arguments.done", **at, arguments=item.arguments)
    else:
        text = item.content[0].text if item.content else ""
        if not opened:
            yield from _message_opened(event, item.model_copy(update={"status": "in_progress",
                                                                      "content": []}), index)
            yield event("response.output_text.delta", **at, content_index=0, delta=text,
                        logprobs=[])
        yield event("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", **at, content_index=0,
                    part=OutputText(text=text))
    yield event("response.output_item.done", output_index=index, item=item)
