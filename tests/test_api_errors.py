"""Errors in OpenAI's shape with the right status, and hostile bodies that change nothing."""
import asyncio
import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]


def assert_error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0), ("top_p", 1.5),
    ("n", 0), ("max_tokens", 0), ("max_tokens", 10**30), ("presence_penalty", 3),
    ("seed", 2**70), ("top_k", -5), ("logit_bias", {"x": 1}), ("logit_bias", {"1": 500}),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", 5), ("top_logprobs", 2),
    ("temperature", "hot"), ("messages", []), ("messages", "Hi"),
])
def test_invalid_value_is_400_naming_it(live_server, field, value):
    body = json.dumps({"messages": HI, "max_tokens": 2, field: value})  # NaN stays NaN
    resp = httpx.post(live_server.url + CHAT, content=body,
                      headers={"Content-Type": "application/json"})
    error = assert_error(resp, 400, field)
    assert error["type"] == "invalid_request_error"


def test_context_length_names_the_parameter_used(live_server):
    resp = httpx.post(live_server.url + CHAT, json={"messages": HI, "max_tokens": 10**6})
    assert assert_error(resp, 400, "max_tokens")["code"] == "context_length_exceeded"
    resp = httpx.post(live_server.url + CHAT,
                      json={"messages": HI, "max_completion_tokens": 10**6})
    assert_error(resp, 400, "max_completion_tokens")
    long = [{"role": "user", "content": "word " * 20000}]
    assert_error(httpx.post(live_server.url + CHAT, json={"messages": long}, timeout=30),
                 400, "messages")


def test_wrong_types_name_the_field(live_server):
    resp = httpx.post(live_server.url + CHAT, json={"messages": [{"role": "robot"}]})
    assert_error(resp, 400, "messages.0.role")
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(httpx.post(live_server.url + CHAT, json={"messages": parts}), 400,
                 "messages.0.content")
    assert_error(httpx.post(live_server.url + CHAT, json={"max_tokens": 2}), 400, "messages")


HOSTILE = [
    b"{not json", b"", b"[1, 2]", b'"just a string"', b"null",
    b"[" * 100_000 + b"]" * 100_000,                                  # recursion
    b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",             # deep but parsable
    b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',   # invalid UTF-8
    b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1e999}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "n": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1e308}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    b'{"messages": [{"role": "user", "content": {"$gt": ""}}]}',
]


def test_hostile_bodies_are_400_and_disturb_no_one(live_server, openai_client, served_model):
    greedy = {"model": served_model, "messages": HI, "temperature": 0, "max_tokens": 12}
    expected = openai_client.chat.completions.create(**greedy).choices[0].message.content

    async def run():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as http:
            async def hostile():
                return [await http.post(CHAT, content=body,
                                        headers={"Content-Type": "application/json"})
                        for body in HOSTILE]

            async def honest():
                resp = await http.post(CHAT, json=greedy)
                return resp.json()["choices"][0]["message"]["content"]

            return await asyncio.gather(honest(), hostile(), honest())

    before, answers, after = asyncio.run(run())
    for body, resp in zip(HOSTILE, answers, strict=True):
        assert resp.status_code == 400, body[:80]
        assert_error(resp, 400, resp.json()["error"]["param"])
    assert before == after == expected
    assert httpx.get(live_server.url + "/ready").status_code == 200


def test_unknown_model_is_404(live_server):
    for path, body in ((CHAT, {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
        resp = httpx.post(live_server.url + path, json={**body, "model": "gpt-9"})
        assert assert_error(resp, 404, "model")["code"] == "model_not_found"
    assert_error(httpx.get(live_server.url + "/v1/models/gpt-9"), 404, "model")


def test_body_over_the_limit_is_413(live_server):
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    resp = httpx.post(live_server.url + CHAT, json=big)
    assert assert_error(resp, 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 32768
        yield b'"}]}'

    resp = httpx.post(live_server.url + CHAT, content=chunked(),
                      headers={"Content-Type": "application/json"})
    assert_error(resp, 413)


def test_unknown_route_and_method_keep_the_shape(live_server):
    assert_error(httpx.get(live_server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(live_server.url + CHAT), 405)


# ---- OpenAI's own rules (each returned 200 here before) --------------------------------

@pytest.mark.parametrize("path, body, param, says", [
    (CHAT, {"messages": HI, "temperature": 2.5}, "temperature", "between 0 and 2"),
    (CHAT, {"messages": HI, "max_tokens": 3, "min_tokens": 5}, "min_tokens", "max_tokens"),
    (CHAT, {"messages": HI, "max_completion_tokens": 3, "min_tokens": 5}, "min_tokens",
     "max_tokens"),
    (CHAT, {"messages": [{"role": "assistant"}, *HI]}, "messages.0.content", "content"),
    (CHAT, {"messages": HI, "stream_options": {"include_usage": True}}, "stream_options",
     "stream"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}},
     "stream_options", "stream"),
    (CHAT, {"messages": HI, "stop": list("abcde")}, "stop", "at most 4"),
])
def test_openai_rules_are_400_naming_the_parameter(live_server, path, body, param, says):
    error = assert_error(httpx.post(live_server.url + path, json={"max_tokens": 2, **body}),
                         400, param)
    assert says in error["message"]


def test_null_max_tokens_on_completions_is_16(live_server):
    resp = httpx.post(live_server.url + "/v1/completions", timeout=60, json={
        "prompt": "Once upon a time", "max_tokens": None, "temperature": 0, "ignore_eos": True})
    assert resp.json()["usage"]["completion_tokens"] == 16


def test_unknown_fields_are_logged_once_per_name(live_server):
    body = {"messages": [{"role": "user", "content": "Hi", "mood": 1}], "max_tokens": 1,
            "frobnicate": True}
    for _ in range(2):
        assert httpx.post(live_server.url + CHAT, json=body, timeout=60).status_code == 200
    log = live_server.log()
    assert log.count("ignoring unknown field 'frobnicate'") == 1
    assert log.count("ignoring unknown field 'messages.mood'") == 1
