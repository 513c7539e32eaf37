"""POST /v1/responses and GET /v1/responses/{id} through the real openai SDK."""
import json

import httpx
import openai
import pytest

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0, "max_output_tokens": 40}


def token_count(server, messages) -> int:
    return httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=30).json()[
        "count"]


@pytest.fixture(scope="module")
def paris(openai_client, served_model):
    return openai_client.responses.create(model=served_model, input=QUESTION, **GREEDY)


def test_plain_response(paris, live_server, openai_client, served_model):
    assert paris.object == "response" and paris.status == "completed"
    assert paris.id.startswith("resp_") and paris.model == served_model
    assert "Paris" in paris.output_text
    [message] = paris.output
    assert message.type == "message" and message.role == "assistant"
    assert [c.type for c in message.content] == ["output_text"]
    assert paris.usage.input_tokens == token_count(live_server,
                                                   [{"role": "user", "content": QUESTION}])
    assert paris.usage.total_tokens == paris.usage.input_tokens + paris.usage.output_tokens
    assert openai_client.responses.retrieve(paris.id).output_text == paris.output_text


def test_streamed_equals_plain(paris, openai_client, served_model):
    with openai_client.responses.stream(model=served_model, input=QUESTION, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == paris.output_text
    assert final.usage.output_tokens == paris.usage.output_tokens
    assert openai_client.responses.retrieve(final.id).output_text == paris.output_text


def test_items_instructions_and_previous_response_continue(live_server, openai_client,
                                                           served_model):
    first = openai_client.responses.create(
        model=served_model, instructions="Answer in one short sentence.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        **GREEDY)
    system = {"role": "system", "content": "Answer in one short sentence."}
    turn = [{"role": "user", "content": QUESTION}]
    assert first.usage.input_tokens == token_count(live_server, [system, *turn])
    second = openai_client.responses.create(model=served_model, input="And of Italy?",
                                            previous_response_id=first.id, **GREEDY)
    # The conversation goes on; the instructions are not carried (as OpenAI does).
    conversation = [*turn, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "And of Italy?"}]
    assert second.usage.input_tokens == token_count(live_server, conversation)
    assert second.previous_response_id == first.id


def test_unknown_ids_are_404(openai_client, served_model):
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.responses.create(model=served_model, input="Hi",
                                       previous_response_id="resp_nope")
    assert info.value.body["param"] == "previous_response_id"


def test_unstored_response_is_not_kept(openai_client, served_model):
    resp = openai_client.responses.create(model=served_model, input="Hi", store=False,
                                          max_output_tokens=2)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(resp.id)


TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


@pytest.mark.parametrize("extra, param", [
    # tool_choice "auto" (the default) reads calls from free text: that needs --tool-call-parser.
    ({"tools": [TOOL]}, "tool_choice"),
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": []}, "input"),
])
def test_refused_is_400_naming_the_parameter(live_server, extra, param):
    resp = httpx.post(live_server.url + "/v1/responses", timeout=30,
                      json={"input": "Hi", "max_output_tokens": 2, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_text_format_json_schema_constrains_the_output_text(live_server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    resp = httpx.post(live_server.url + "/v1/responses", timeout=60, json={
        "input": "Name a city in France as JSON.", "max_output_tokens": 40, "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "city", "schema": schema}}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "completed" and body["text"]["format"]["type"] == "json_schema"
    answer = json.loads(body["output"][0]["content"][0]["text"])
    assert set(answer) == {"city"} and isinstance(answer["city"], str)


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}
FORCED_CALL = {"input": "What is the weather in Paris?", "tools": [WEATHER],
               "tool_choice": "required", "temperature": 0, "max_output_tokens": 60}


def test_function_tool_round_trip_through_function_call_output(live_server, openai_client,
                                                              served_model):
    first = openai_client.responses.create(model=served_model, **FORCED_CALL)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and calls and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city"}
    second = openai_client.responses.create(
        model=served_model, previous_response_id=first.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "sunny, 24 C"}], temperature=0, max_output_tokens=20)
    assert [item.type for item in second.output] == ["message"] and second.output_text
    # The second prompt is the first turn, its call and the call's output, as chat messages.
    call = {"id": calls[0].call_id, "type": "function",
            "function": {"name": calls[0].name, "arguments": calls[0].arguments}}
    assert second.usage.input_tokens == token_count(live_server, [
        {"role": "user", "content": FORCED_CALL["input"]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"}])


def test_streamed_function_call_equals_the_whole_one(openai_client, served_model):
    whole = openai_client.responses.create(model=served_model, **FORCED_CALL)
    with openai_client.responses.stream(model=served_model, **FORCED_CALL) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in final.output] == \
        [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in whole.output]
