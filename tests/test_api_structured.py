"""Structured output and tool calling through the real openai SDK against the served default
model: its 135M parameters rarely manage JSON on their own, so every valid answer here is the
grammar's doing. One server for the module, with the hermes parser for tool_choice auto."""
import asyncio
import json
import random
from typing import Literal

import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI
from pydantic import BaseModel

PET = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "kind": {"enum": ["cat", "dog", "fish"]}},
    "required": ["name", "age", "kind"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--tool-call-parser", "hermes")


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_json_schema_output_validates_for_several_seeds(client, model):
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a pet."}], n=3, seed=7,
        temperature=1.0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}})
    assert len(resp.choices) == 3
    for choice in resp.choices:
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
        jsonschema.validate(json.loads(choice.message.content), PET)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int
    vaccinated: bool


def test_parse_fills_the_pydantic_model(client, model):
    resp = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Describe a pet."}], temperature=0,
        max_tokens=40, response_format=Pet)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Pet) and parsed == Pet.model_validate_json(resp.choices[0].message.content)


def _check_calls(choice, names):
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return choice.message.tool_calls


def test_required_and_named_tool_choice_return_valid_calls(client, model):
    resp = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", seed=3,
        temperature=1.0, max_tokens=80, parallel_tool_calls=False)
    assert len(_check_calls(resp.choices[0], {"get_weather", "get_time"})) == 1
    resp = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in _check_calls(resp.choices[0], {"get_time"})] == ["get_time"]


def test_streamed_tool_call_deltas_assemble_into_the_same_call(client, model):
    kwargs = dict(model=model, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    deltas, reasons = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        deltas += delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
        assert not delta.content  # only the opening chunk's empty content
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == whole.function.arguments
    assert reasons[-1] == "tool_calls" and reasons.count("tool_calls") == 1


def test_tool_choice_none_gives_text_and_auto_reads_text_as_text(client, model):
    answers = [client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice=choice, temperature=0,
        max_tokens=8).choices[0] for choice in ("none", "auto")]
    for choice in answers:
        assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
        assert choice.message.content
    assert answers[0].message.content == answers[1].message.content


def test_tool_result_round_trip_answers(client, model, tokenizer):
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"}]
    resp = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                          tool_choice="none", temperature=0, max_tokens=12)
    assert resp.choices[0].message.content and resp.choices[0].message.tool_calls is None
    rendered = [*ASK, {"role": "assistant", "content": "",
                       "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {
                           "city": "Paris", "unit": "celsius"}}}]},
                {"role": "tool", "content": "18 degrees, sunny", "tool_call_id": "call_abc"}]
    text = tokenizer.render_chat(rendered, tools=[WEATHER])
    assert "18 degrees, sunny" in text
    assert resp.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                            "properties": 3}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_invalid_schemas_and_choices_are_400(client, model, body, param):
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4, extra_body=body)
    assert exc.value.body["param"] == param and "Check failed" not in exc.value.body["message"]


def test_completions_take_structured_outputs_and_guided_fields(client, model):
    resp = client.completions.create(model=model, prompt="Is the sky blue? Answer:", max_tokens=5,
                                     extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert resp.choices[0].text in ("yes", "no")
    resp = client.completions.create(model=model, prompt="Phone:", max_tokens=12, temperature=1,
                                     extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    text = resp.choices[0].text
    assert len(text) == 8 and text[3] == "-" and (text[:3] + text[4:]).isdigit()


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "number", "enum", "string", "boolean", "anyOf"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 10}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x y", 'q"uote'], rng.randint(1, 3))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "anyOf":
        return {"anyOf": [_random_schema(rng, 2), _random_schema(rng, 2)]}
    if kind == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1), "maxItems": 3}
    names = rng.sample(["a", "b", "c", "d"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: _random_schema(rng, depth + 1) for n in names},
            "required": names, "additionalProperties": False}


async def test_generated_schemas_every_output_parses_and_validates(server, model):
    """A property test over generated schemas (objects, arrays, enums, bounded numbers, nested,
    anyOf), the requests batched together at temperature 1."""
    rng = random.Random(18)
    schemas = [_random_schema(rng) for _ in range(8)]
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answers = await asyncio.gather(*[client.completions.create(
        model=model, prompt="JSON:", max_tokens=150, temperature=1.0, seed=i,
        extra_body={"structured_outputs": {"json": schema}}) for i, schema in enumerate(schemas)])
    for schema, resp in zip(schemas, answers):
        assert resp.choices[0].finish_reason == "stop", (schema, resp.choices[0].text)
        jsonschema.validate(json.loads(resp.choices[0].text), schema)
