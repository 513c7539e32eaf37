"""Many clients at once, and clients that leave: nothing may stay behind in the engine."""
import asyncio
import time

import httpx
from openai import AsyncOpenAI

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ENDLESS = {"messages": FRANCE, "max_tokens": 1000, "extra_body": {"ignore_eos": True}}


def assert_idle(live_server) -> None:
    m = live_server.wait_idle(timeout=10)
    assert m["wattserve:num_requests_running"] == 0
    assert m["wattserve:num_requests_waiting"] == 0
    assert m["wattserve:kv_cache_blocks_used"] == 0


async def test_32_concurrent_streams_all_complete(live_server, served_model):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=served_model, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        return finish[-1], chunks[-1].usage.completion_tokens

    async with AsyncOpenAI(base_url=live_server.url + "/v1", api_key="unused",
                           max_retries=0, timeout=120) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(32)))
    assert len(results) == 32
    assert all(reason in ("stop", "length") and 0 < tokens <= 8 for reason, tokens in results)
    assert_idle(live_server)


async def test_disconnect_mid_stream_frees_everything(live_server, served_model):
    async with AsyncOpenAI(base_url=live_server.url + "/v1", api_key="unused",
                           max_retries=0) as client:
        stream = await client.chat.completions.create(model=served_model, stream=True,
                                                      **ENDLESS)
        received = 0
        async for _ in stream:
            received += 1
            if received == 5:
                break
        m = live_server.metrics()
        assert m["wattserve:num_requests_running"] == 1
        assert m["wattserve:kv_cache_blocks_used"] > 0
        await stream.close()
    assert_idle(live_server)


def test_disconnect_while_waiting_for_a_whole_answer_aborts_it(live_server, served_model):
    started = time.monotonic()
    body = {"model": served_model, "messages": FRANCE, "max_tokens": 1000, "ignore_eos": True}
    try:  # 1000 tokens take far longer than the client waits
        httpx.post(live_server.url + "/v1/chat/completions", json=body, timeout=1.5)
    except httpx.ReadTimeout:
        pass
    assert_idle(live_server)
    assert time.monotonic() - started < 8
