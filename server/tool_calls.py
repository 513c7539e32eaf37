"""From a chat request's tools and tool_choice to the engine's output constraint, and from the
generated text back to OpenAI's tool calls.

`required` and a named function are enforced by a grammar, so even a weak model answers with a
valid call: a named function's output is its arguments object; `required` outputs a JSON array
`[{"name": ..., "parameters": {...}}, ...]` (at most one element without parallel calls), each
element's parameters constrained by its function's schema. `auto` leaves the model free and
parses its own format (server/tool_parsers.py). One reader turns the text into OpenAI's pieces
(content, or a call's header then its argument fragments) for a stream and a whole answer
alike, so the two always agree.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Literal

from wattserve.engine.request import InvalidRequestError
from wattserve.engine.structured.spec import OutputConstraint
from wattserve.server.protocol_tools import (
    FunctionCall, FunctionCallDelta, NamedToolChoice, Tool, ToolCall, ToolCallDelta, ToolChoice,
)
from wattserve.server.tool_parsers import ToolParser

Mode = Literal["named", "required", "auto"]


@dataclass
class ToolPlan:
    mode: Mode | None  # None: the answer is text (no tools, or tool_choice "none")
    constraint: OutputConstraint | None = None
    name: str | None = None  # the named function
    parser: ToolParser | None = None  # auto
    parallel: bool = True


def plan_tools(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None,
               parser: ToolParser | None) -> ToolPlan:
    """Raises InvalidRequestError for a choice that the tools or the server cannot honour."""
    tools = tools or []
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise InvalidRequestError("tool_choice needs tools", "tool_choice")
    parallel = parallel is not False
    if choice == "none":
        return ToolPlan(None)
    if isinstance(choice, NamedToolChoice):
        tool = next((t for t in tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not "
                                      "among the tools", "tool_choice")
        return ToolPlan("named", _schema(_parameters(tool)), name=tool.function.name)
    if choice == "required":
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": t.function.name},
                                              "parameters": _parameters(t)},
             "required": ["name", "parameters"], "additionalProperties": False}
            for t in tools]}}
        if not parallel:
            calls["maxItems"] = 1
        return ToolPlan("required", _schema(calls), parallel=parallel)
    if parser is None:
        raise InvalidRequestError(
            "tool_choice 'auto' needs the model's tool-call format, which this model's chat "
            "template does not show: start the server with --tool-call-parser, or send "
            "tool_choice 'required' or a named function", "tool_choice")
    return ToolPlan("auto", parser=parser, parallel=parallel)


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _schema(schema: dict) -> OutputConstraint:
    return OutputConstraint("json_schema", json.dumps(schema))


@dataclass
class Piece:
    """What one stream delta carries: content text or one call's delta."""

    content: str | None = None
    call: ToolCallDelta | None = None


class ToolCallReader:
    """Reads one choice's text as it grows (`feed`), then `finish()`."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.num_calls = 0
        self._text = ""
        self._sent = 0  # characters of _text handed out as content or arguments
        self._in_args = False  # required: inside a call's parameters
        self._depth = 0
        self._in_string = self._escaped = False

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        if self.plan.mode == "named":
            pieces = [] if self.num_calls else [self._header(self.plan.name)]
            return pieces + self._arguments(len(self._text))
        if self.plan.mode == "required":
            return self._read_array()
        return self._read_auto(final=False)

    def finish(self) -> list[Piece]:
        if self.plan.mode == "auto":
            return self._read_auto(final=True)
        return []

    # ---- named and required ------------------------------------------------------------
    def _header(self, name: str) -> Piece:
        self.num_calls += 1
        return Piece(call=ToolCallDelta(index=self.num_calls - 1, id=new_call_id(), type="function",
                                        function=FunctionCallDelta(name=name, arguments="")))

    def _arguments(self, end: int) -> list[Piece]:
        fragment, self._sent = self._text[self._sent:end], end
        if not fragment:
            return []
        return [Piece(call=ToolCallDelta(index=self.num_calls - 1,
                                         function=FunctionCallDelta(arguments=fragment)))]

    _element = re.compile(r'\s*\}?\s*[\[,]\s*\{"name":\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters":\s*(?=\{)')

    def _read_array(self) -> list[Piece]:
        pieces = []
        while True:
            if not self._in_args:
                match = self._element.match(self._text, self._sent)
                if match is None or (not self.plan.parallel and self.num_calls):
                    return pieces
                pieces.append(self._header(json.loads(match.group(1))))
                self._sent, self._in_args, self._depth = match.end(), True, 0
                continue
            end = self._scan_value()
            pieces += self._arguments(len(self._text) if end is None else end)
            if end is None:
                return pieces
            self._in_args = False

    def _scan_value(self) -> int | None:
        """Where the parameters object that started at _sent ends, if it has."""
        for i in range(self._sent, len(self._text)):
            c = self._text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None

    # ---- auto --------------------------------------------------------------------------
    def _read_auto(self, final: bool) -> list[Piece]:
        parser = self.plan.parser
        start = parser.call_start(self._text)
        if start is None:
            end = len(self._text) if final else self._safe_end(parser.marker)
            return self._content(end)
        pieces = self._content(start)
        if not final:
            return pieces  # the calls are read whole, once the output is complete
        content, calls = parser.parse(self._text[start:])
        if not calls:
            return pieces + self._content(len(self._text))
        if not self.plan.parallel:
            calls = calls[:1]
        for call in calls:
            pieces.append(self._header(call.name))
            pieces.append(Piece(call=ToolCallDelta(index=self.num_calls - 1,
                                                   function=FunctionCallDelta(arguments=call.arguments))))
        self._sent = len(self._text)
        return pieces

    def _safe_end(self, marker: str) -> int:
        """Content up to here cannot be part of a call: hold back leading whitespace (a call
        may follow it) and a tail that could begin the marker."""
        if not self._text.strip():
            return self._sent
        for k in range(min(len(marker) - 1, len(self._text)), 0, -1):
            if marker.startswith(self._text[-k:]):
                return max(self._sent, len(self._text) - k)
        return len(self._text)

    def _content(self, end: int) -> list[Piece]:
        text, self._sent = self._text[self._sent:end], max(self._sent, end)
        return [Piece(content=text)] if text else []


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def assemble(pieces: list[Piece]) -> tuple[str | None, list[ToolCall] | None]:
    """A whole answer from its pieces: (content, tool calls); content None when only calls."""
    content = "".join(p.content for p in pieces if p.content is not None)
    calls: list[ToolCall] = []
    for p in pieces:
        if p.call is None:
            continue
        if p.call.id is not None:
            calls.append(ToolCall(id=p.call.id, function=FunctionCall(name=p.call.function.name,
                                                                      arguments="")))
        calls[p.call.index].function.arguments += p.call.function.arguments or ""
    if not calls:
        return content, None
    return content.strip() or None, calls
