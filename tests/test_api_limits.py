"""API key, queue limit (429), request timeout and graceful shutdown, on one strict server:
one sequence at a time, one waiting request at most, three seconds per request."""
import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from openai import OpenAI

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ENDLESS = {"messages": FRANCE, "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--api-key", KEY, "--max-num-seqs", "1", "--max-queue-len", "1",
                        "--request-timeout", "3", "--shutdown-grace-seconds", "20")


def post_chat(server, body, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=30, **kw)


def test_api_key_guards_v1_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for resp in (httpx.get(server.url + "/v1/models", headers=headers),
                     httpx.post(server.url + "/v1/chat/completions", headers=headers,
                                content=b"{not even json")):
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert httpx.get(server.url + path).status_code == 200
    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=2)
    assert resp.usage.completion_tokens == 2


def test_bearer_scheme_in_any_case_and_401_names_it(server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        resp = httpx.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert resp.status_code == 200
    resp = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"


def test_full_queue_is_429_with_retry_after(server):
    def stream(body):
        return httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                            json={**body, "stream": True}, timeout=30)

    with stream(ENDLESS) as running:
        lines = running.iter_lines()  # kept: dropping it would close the connection
        next(lines)  # admitted and decoding: the one sequence slot is taken
        waiting = threading.Thread(target=lambda: post_chat(server, ENDLESS))
        waiting.start()
        deadline = time.monotonic() + 2
        while server.metrics()["wattserve:num_requests_waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        resp = post_chat(server, ENDLESS)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    waiting.join()
    assert server.wait_idle()["wattserve:kv_cache_blocks_used"] == 0


def test_request_timeout_aborts_the_request(server):
    started = time.monotonic()
    resp = post_chat(server, ENDLESS)
    assert resp.status_code == 408 and 3 <= time.monotonic() - started < 6
    assert resp.json()["error"]["code"] == "request_timeout"
    assert server.wait_idle()["wattserve:num_requests_running"] == 0

    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                      json={**ENDLESS, "stream": True}, timeout=30) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert server.wait_idle()["wattserve:kv_cache_blocks_used"] == 0


def test_sigterm_finishes_in_flight_requests_then_exits(server):
    """Last in this module: it stops the module's server."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                      json={**ENDLESS, "max_tokens": 30, "stream": True}) as resp:
        lines = resp.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        health = httpx.get(server.url + "/health")  # still answering, but draining
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        refused = post_chat(server, {**ENDLESS, "max_tokens": 2})
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]["message"]
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    try:
        assert server.proc.wait(15) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit after its in-flight request finished")
    assert "stopping the engine" in server.log() and "Traceback" not in server.log()

