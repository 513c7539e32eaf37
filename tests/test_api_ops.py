"""Models, health, readiness, version, metrics and the OpenAPI schema.

Most run in-process against an app whose engine never started: that is also how "not
ready" looks, and it needs no model.
"""
import httpx
import pytest

from conftest import engine_info
from wattserve.engine.client import EngineClient, EngineSnapshot
from wattserve.engine.request import EngineDead
from wattserve.engine.stats import EngineStats
from wattserve.server.app import build_app
from wattserve.server.state import ServerConfig


class NeverStartedEngine(EngineClient):
    def __init__(self):
        super().__init__(engine_info(), tokenizer=None)

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(EngineStats(num_running=0, num_waiting=0, num_total_blocks=10,
                                          num_free_blocks=10, block_size=16, num_preemptions=0,
                                          kv_cache_tokens=160), None, None)

    def add_observer(self, observer) -> None:
        pass


@pytest.fixture
def app():
    # Used through ASGITransport, which runs no lifespan: the engine is never started.
    return build_app(NeverStartedEngine(), ServerConfig(served_model_names=["mine", "alias"]))


@pytest.fixture
async def app_client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        yield client


async def test_not_ready_is_503_but_alive(app_client):
    assert (await app_client.get("/health")).json() == {"status": "ok"}
    for resp in (await app_client.get("/ready"),
                 await app_client.post("/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "Hi"}]}),
                 await app_client.post("/v1/completions", json={"prompt": "Hi"})):
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "not_ready"
        assert resp.headers["x-request-id"]


async def test_an_engine_loop_that_died_fails_liveness(app, app_client):
    engine = app.state.server.engine
    engine._started = True  # started, then died
    engine._die(EngineDead("the engine process exited with code -9"))
    resp = await app_client.get("/health")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_ready"
    assert "exited with code -9" in resp.json()["error"]["message"]


async def test_a_draining_server_says_so_and_refuses_new_requests(app, app_client):
    app.state.server.engine._started = True
    app.state.server.draining = True
    health = await app_client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    resp = await app_client.post("/v1/completions", json={"prompt": "Hi"})
    assert resp.status_code == 503 and "shutting down" in resp.json()["error"]["message"]


async def test_served_model_names(app_client):
    models = (await app_client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["mine", "alias"]
    card = (await app_client.get("/v1/models/alias")).json()
    assert card["object"] == "model" and card["root"] == "smol"
    assert card["max_model_len"] == 2048 and card["owned_by"] == "wattserve"


async def test_version_and_openapi_describe_the_real_bodies(app_client):
    assert (await app_client.get("/version")).json()["version"]
    schema = (await app_client.get("/openapi.json")).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    props = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert {"messages", "max_completion_tokens", "top_logprobs", "stream_options",
            "ignore_eos", "top_k"} <= set(props)
    assert {"400", "404", "429", "503"} <= set(chat["responses"])
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "logprobs", "echo", "best_of"} <= set(completion)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}, path
    assert {"/v1/responses/{response_id}", "/tokenize", "/detokenize"} <= set(schema["paths"])


def test_live_models_and_metrics(live_server, openai_client, served_model):
    card = openai_client.models.retrieve(served_model)
    assert card.id == served_model and "SmolLM2" in served_model
    before = live_server.metrics()
    resp = openai_client.chat.completions.create(
        model=served_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    after = live_server.metrics()
    assert after["wattserve:prompt_tokens_total"] - before["wattserve:prompt_tokens_total"] \
        == resp.usage.prompt_tokens
    assert after["wattserve:generation_tokens_total"] \
        - before["wattserve:generation_tokens_total"] == resp.usage.completion_tokens
    assert after["wattserve:kv_cache_blocks_total"] > 0
    assert "# HELP wattserve:num_requests_running" in httpx.get(live_server.url + "/metrics").text
