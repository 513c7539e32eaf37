"""Tool-call parsing (server/tool_parsers.py) and the reader that turns a growing output into
OpenAI's pieces (server/tool_calls.py), on literal model-format strings: no model needed."""
import json

import pytest

from wattserve.engine.request import InvalidRequestError
from wattserve.server.protocol_tools import NamedToolChoice, Tool
from wattserve.server.tool_calls import ToolCallReader, assemble, plan_tools
from wattserve.server.tool_parsers import (
    HermesParser, Llama3JsonParser, MistralParser, parser_for,
)

WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}})
TIME = Tool.model_validate({"type": "function", "function": {"name": "get_time"}})


def test_hermes_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = HermesParser().parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_llama3_json_with_and_without_python_tag():
    for text in ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 '{"name": "get_weather", "parameters": {"city": "Oslo"}}'):
        content, calls = Llama3JsonParser().parse(text)
        assert content is None and calls[0].name == "get_weather"
        assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    _, calls = Llama3JsonParser().parse('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {}), ("b", {"x": 1})]


def test_mistral_calls():
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    for t in (text, text.removeprefix("[TOOL_CALLS]")):  # the marker is a special token
        content, calls = MistralParser().parse(t)
        assert content is None and calls[0].name == "get_weather"


def test_text_that_is_no_call_stays_content():
    for parser in (HermesParser(), Llama3JsonParser(), MistralParser()):
        assert parser.parse("The weather is fine.") == ("The weather is fine.", [])
    assert HermesParser().parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_parser_chosen_from_template_or_flag():
    assert isinstance(parser_for(None, "{{ '<tool_call>' }}"), HermesParser)
    assert isinstance(parser_for(None, "[TOOL_CALLS] {{ x }}"), MistralParser)
    assert isinstance(parser_for(None, "<|python_tag|>"), Llama3JsonParser)
    assert parser_for(None, "{{ message['content'] }}") is None
    assert isinstance(parser_for("mistral", "{{ '<tool_call>' }}"), MistralParser)


def _stream(reader, text, step=3):
    pieces = []
    for i in range(0, len(text), step):
        pieces += reader.feed(text[i:i + step])
    return pieces + reader.finish()


def test_required_array_streams_header_then_argument_fragments():
    plan = plan_tools([WEATHER, TIME], "required", None, None)
    assert json.loads(plan.constraint.spec)["minItems"] == 1
    text = ('[{"name": "get_weather", "parameters": {"city": "Pa\\"ris}"}}, '
            '{"name": "get_time", "parameters": {}}]')
    pieces = _stream(ToolCallReader(plan), text)
    first = pieces[0].call
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "get_weather"
    assert all(p.call.id is None for p in pieces[1:] if p.call.index == 0)
    content, calls = assemble(pieces)
    assert content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Pa"ris}'}), ("get_time", {})]
    whole = ToolCallReader(plan)
    assert [c.function.arguments for c in assemble(whole.feed(text))[1]] == [
        c.function.arguments for c in calls]


def test_named_and_single_calls():
    plan = plan_tools([WEATHER, TIME], NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "get_weather"}}), None, None)
    assert json.loads(plan.constraint.spec) == WEATHER.function.parameters
    content, calls = assemble(_stream(ToolCallReader(plan), '{"city": "Lima"}'))
    assert content is None and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == '{"city": "Lima"}'
    plan = plan_tools([WEATHER], "required", False, None)
    assert json.loads(plan.constraint.spec)["maxItems"] == 1


def test_auto_holds_back_only_what_may_be_a_call():
    plan = plan_tools([WEATHER], "auto", None, HermesParser())
    reader = ToolCallReader(plan)
    assert [p.content for p in reader.feed("Hello <tool")] == ["Hello "]
    assert reader.feed('_call>{"name": "get_weather", "arguments": {"city": "X"}}') == []
    pieces = reader.feed("</tool_call>") + reader.finish()
    assert pieces[0].call.function.name == "get_weather"
    assert json.loads(pieces[1].call.function.arguments) == {"city": "X"}
    reader = ToolCallReader(plan)
    assert "".join(p.content for p in _stream(reader, "No <tools> here.")) == "No <tools> here."


def test_bad_tool_choices_are_400s():
    with pytest.raises(InvalidRequestError, match="not among the tools") as exc:
        plan_tools([WEATHER], NamedToolChoice.model_validate(
            {"type": "function", "function": {"name": "nope"}}), None, None)
    assert exc.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError, match="needs tools"):
        plan_tools(None, "required", None, None)
    with pytest.raises(InvalidRequestError, match="--tool-call-parser"):
        plan_tools([WEATHER], None, None, None)  # auto by default, and no format known
    assert plan_tools([WEATHER], "none", None, None).mode is None
