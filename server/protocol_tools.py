"""Request and response bodies for structured output and tool calling (OpenAI's shapes, plus
vLLM's `structured_outputs` / `guided_*` extras), used by server/protocol.py."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from wattserve.engine.request import InvalidRequestError
from wattserve.engine.structured.spec import OutputConstraint


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    # `schema` would shadow BaseModel.schema(): stored under another name, sent as "schema".
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_input(self) -> dict:
        """HF chat templates read arguments as a mapping (Llama 3.1: `arguments | tojson`)."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class _Sparse(BaseModel):
    @model_serializer(mode="wrap")
    def _only_present(self, handler):
        # OpenAI's deltas carry only what changed: never "id": null in a call's later pieces.
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Sparse):
    """A streamed piece of a call: the first has id, type and name; later ones arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


def requested_constraint(response_format: ResponseFormat | None,
                         structured: StructuredOutputs | None) -> OutputConstraint | None:
    """The constraint a body's response_format or structured_outputs asks for, if any;
    InvalidRequestError when it asks for two or for nothing usable."""
    given = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            given.append(("response_format", OutputConstraint("json_object")))
        elif response_format.json_schema is None or not response_format.json_schema.json_schema:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                      "response_format")
        else:
            given.append(("response_format", _json_schema(response_format.json_schema.json_schema)))
    if structured is not None:
        fields = {"json": structured.json_, "regex": structured.regex, "choice": structured.choice,
                  "grammar": structured.grammar, "json_object": structured.json_object or None}
        for name, value in fields.items():
            if value is None:
                continue
            if name == "json":
                given.append(("structured_outputs", _json_schema(value)))
            elif name == "choice":
                given.append(("structured_outputs", OutputConstraint("choice", json.dumps(value))))
            elif name == "json_object":
                given.append(("structured_outputs", OutputConstraint("json_object")))
            else:
                given.append(("structured_outputs", OutputConstraint(name, value)))
    if len(given) > 1:
        raise InvalidRequestError("give one output constraint: response_format or one field of "
                                  "structured_outputs (guided_*)", given[1][0])
    return given[0][1] if given else None


def _json_schema(schema: dict | str) -> OutputConstraint:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequestError("the JSON schema is not valid JSON", "structured_outputs") from None
    return OutputConstraint("json_schema", json.dumps(schema))
