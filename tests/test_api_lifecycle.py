"""The two processes' lifecycle, against real servers: an engine process that dies ends every
open request with an error and takes the server down (exit 1); a SIGTERM whose grace period
runs out ends what still runs with proper errors (exit 0); a burst on an idle server is not
a queue."""
import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
from openai import AsyncOpenAI

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"messages": FRANCE, "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def engine_pid(server) -> int:
    return int(re.search(r"engine core process started \(pid (\d+)\)", server.log()).group(1))


class OpenRequests:
    """A stream and a whole-answer request, each on its own thread, both in the engine."""

    def __init__(self, server):
        self.stream_lines: list[str] = []
        self.whole: httpx.Response | None = None
        url = server.url + "/v1/chat/completions"

        def stream():
            with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line:
                        self.stream_lines.append(line)

        def whole():
            self.whole = httpx.post(url, json=LONG, timeout=60)

        self.threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 30
        while server.metrics()["wattserve:num_requests_running"] < 2 or not self.stream_lines:
            assert time.monotonic() < deadline, "the requests did not start"
            time.sleep(0.05)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(60)

    def assert_ended_with_503s(self) -> None:
        assert self.whole.status_code == 503
        assert set(self.whole.json()["error"]) == {"message", "type", "param", "code"}
        assert self.stream_lines[-1] == "data: [DONE]"
        error = json.loads(self.stream_lines[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and error["code"] == "not_ready"


def test_killing_the_engine_process_ends_every_request_and_the_server(start_server):
    server = start_server()
    requests = OpenRequests(server)
    os.kill(engine_pid(server), signal.SIGKILL)
    killed = time.monotonic()
    while httpx.get(server.url + "/health", timeout=2).status_code != 503:
        assert time.monotonic() - killed < 2, "/health still ok 2 s after the engine died"
        time.sleep(0.05)
    requests.join()
    requests.assert_ended_with_503s()
    assert "exited with code -9" in requests.whole.json()["error"]["message"]
    assert server.proc.wait(15) == 1  # non-zero: an orchestrator restarts it


def test_an_expired_grace_period_ends_requests_with_errors(start_server):
    server = start_server("--shutdown-grace-seconds", "2")
    requests = OpenRequests(server)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    requests.join()
    requests.assert_ended_with_503s()
    assert "shut down before the request finished" in requests.whole.json()["error"]["message"]
    assert server.proc.wait(15) == 0
    log = server.log()
    assert "ending 2 open requests" in log and "Traceback" not in log


async def test_a_burst_on_free_slots_is_not_a_queue(start_server):
    server = start_server("--max-queue-len", "4")
    async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120) as client:
        model = (await client.models.list()).data[0].id
        # Any 429 would raise here (the SDK retries nothing).
        replies = await asyncio.gather(*(
            client.chat.completions.create(model=model, messages=FRANCE, max_tokens=4,
                                           temperature=0) for _ in range(10)))
    assert len({r.choices[0].message.content for r in replies}) == 1  # greedy: one answer
    assert all(r.usage.completion_tokens > 0 for r in replies)
