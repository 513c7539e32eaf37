"""The Responses API as a translation onto chat completions: a ResponsesRequest (plus the
stored conversation it continues) becomes a ChatCompletionRequest, so messages, tools,
tool_choice and structured output have one implementation, the chat path's.

Chat fields this server does not implement yet are refused, never dropped: a translated
request with a field the chat request does not declare (its unknown fields) is a 400 naming
the Responses parameter it came from.
"""
from __future__ import annotations

from pydantic import ValidationError

from wattserve.engine.request import InvalidRequestError
from wattserve.server.protocol import ChatCompletionRequest
from wattserve.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    ResponsesRequest,
)
from wattserve.server.unknown_fields import unknown_fields

# Chat's name for a parameter -> the Responses API's, for errors.
RESPONSES_NAMES = {
    "messages": "input", "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens", "response_format": "text.format",
    "tools": "tools", "tool_choice": "tool_choice",
}


def turn_messages(body: ResponsesRequest) -> list[dict]:
    """This request's input as chat messages (OpenAI's chat wire format); function calls
    in a row become one assistant message's tool_calls."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict] = []
    for item in body.input:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.output})
        else:
            messages.append({"role": item.role, "content": item.text()})
    return messages


def chat_request(body: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """`messages`: the conversation without instructions (they are not carried on)."""
    chat: dict = {"model": body.model, "max_completion_tokens": body.max_output_tokens,
                  "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream,
                  "messages": ([{"role": "system", "content": body.instructions}]
                               if body.instructions else []) + messages}
    if body.tools:
        chat["tools"] = [{"type": "function", "function": tool.model_dump(
            exclude={"type"}, exclude_none=True)} for tool in body.tools]
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None and (body.tools or choice not in ("auto", "none")):
        chat["tool_choice"] = choice  # without tools, "auto" and "none" ask for nothing
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            by_alias=True, exclude={"type"}, exclude_none=True)}
    elif fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = RESPONSES_NAMES.get(str(error["loc"][0]), "input")
        raise InvalidRequestError(f"cannot be served here: {error['msg']}", param) from None
    for name in unknown_fields(request):
        param = RESPONSES_NAMES.get(name.split(".")[0], "input")
        raise InvalidRequestError(f"'{param}' is not supported by this server yet ({name})",
                                  param)
    return request
