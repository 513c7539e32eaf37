"""Server-Sent Events for chat: OpenAI's chunk sequence, and the same text as non-streamed."""
import json

import httpx
from openai import AsyncOpenAI

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"messages": FRANCE, "temperature": 0, "max_tokens": 12}


def sse_payloads(live_server, body) -> list:
    with httpx.stream("POST", live_server.url + "/v1/chat/completions", json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_chunk_sequence_is_openais(live_server):
    chunks = sse_payloads(live_server, {**GREEDY, "stream": True,
                                        "stream_options": {"include_usage": True}})
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    assert {c["id"] for c in chunks} == {first["id"]} and first["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_without_include_usage_there_is_no_usage(live_server):
    chunks = sse_payloads(live_server, {**GREEDY, "max_tokens": 2, "stream": True})
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_streamed_equals_non_streamed_and_counts_tokens(openai_client, served_model):
    whole = openai_client.chat.completions.create(model=served_model, **GREEDY)
    chunks = list(openai_client.chat.completions.create(
        model=served_model, **GREEDY, stream=True, logprobs=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed_tokens = sum(len(c.choices[0].logprobs.content) for c in chunks
                          if c.choices and c.choices[0].logprobs)
    assert streamed_tokens == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage == whole.usage


def test_n2_streams_every_choice(live_server):
    chunks = sse_payloads(live_server, {**GREEDY, "max_tokens": 3, "n": 2, "seed": 7,
                                        "temperature": 1.0, "stream": True})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length"


async def test_async_stream_equals_non_streamed(live_server, served_model):
    async with AsyncOpenAI(base_url=live_server.url + "/v1", api_key="unused",
                           max_retries=0) as client:
        whole = await client.chat.completions.create(model=served_model, **GREEDY)
        stream = await client.chat.completions.create(model=served_model, **GREEDY, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == whole.choices[0].message.content
