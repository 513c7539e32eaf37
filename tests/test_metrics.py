"""/metrics after real requests: each series moves by what the API returned, SLO counters
for requests made to miss and to meet, energy from an injected constant power source, the
power cap's gauges, and the Grafana dashboard's queries against a live scrape.

The server runs in-process (build_app + uvicorn in a thread) with the engine stepped by an
InprocClient, so a fake power source can be handed to the engine the way its core process
hands it NVML or RAPL.
"""
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from wattserve.engine.power import PowerReading
from wattserve.engine.config import MonitorConfig
from wattserve.server.cli import build_parser, monitor_config, server_config

DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "grafana" / "dashboards" / "wattserve.json"
MODEL = "metrics-test"
WATTS = 40.0
CAP_WATTS = 1000.0
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class ConstantPower:
    name = "fake"

    def read(self):
        return [PowerReading("fake0", power_w=WATTS, temperature_c=45.0, sm_clock_hz=1.5e9,
                             utilization=0.5)]

    def close(self):
        pass


class Scrape:
    def __init__(self, url: str):
        text = httpx.get(url + "/metrics", timeout=10).text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def __call__(self, name: str, **labels) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        return sum(s.value for s in self.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.samples}


@pytest.fixture(scope="module")
def server():
    from wattserve.engine.config import CacheConfig, EngineConfig, MonitorConfig
    from wattserve.engine.inproc_client import InprocClient
    from wattserve.server.app import build_app
    from wattserve.server.state import ServerConfig

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = InprocClient.from_config(EngineConfig(cache=CacheConfig(kv_cache_memory=64 << 20)),
                                      MonitorConfig(power_cap_watts=CAP_WATTS,
                                                    power_sample_interval_ms=20),
                                      ConstantPower())
    config = ServerConfig(served_model_names=[MODEL], slo_ttft_ms=60_000, slo_tpot_ms=60_000,
                          metrics_window_seconds=600)
    app = build_app(engine, config)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


REQUEST_HISTOGRAMS = ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_prefill_time_seconds",
                      "request_decode_time_seconds", "request_inference_time_seconds",
                      "request_prompt_tokens", "request_generation_tokens",
                      "time_per_output_token_seconds", "request_energy_joules")


def test_counters_equal_usage_and_histograms_count_requests(server, client):
    before = Scrape(server)
    started = time.monotonic()
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    streamed = [chunk for chunk in stream][-1].usage
    wall = time.monotonic() - started
    after = Scrape(server)

    def delta(name: str, **labels) -> float:
        return after("wattserve:" + name, **labels) - before("wattserve:" + name, **labels)

    prompts = chat.usage.prompt_tokens + streamed.prompt_tokens
    outputs = chat.usage.completion_tokens + streamed.completion_tokens
    assert outputs == 12
    assert delta("prompt_tokens_total") == prompts
    assert delta("generation_tokens_total") == outputs
    assert delta("request_success_total", finished_reason="length") == 2
    for name in REQUEST_HISTOGRAMS:
        assert delta(name + "_count") == 2, name
    assert delta("request_prompt_tokens_sum") == prompts
    assert delta("request_generation_tokens_sum") == outputs
    assert delta("inter_token_latency_seconds_count") == outputs - 2  # between tokens
    # Every joule of every step went to one of the two requests, at the fake's 40 W.
    energy = delta("inference_energy_joules_total")
    assert delta("request_energy_joules_sum") == pytest.approx(energy, rel=1e-9)
    busy = delta("request_inference_time_seconds_sum")
    assert WATTS * busy * 0.8 < energy <= WATTS * wall
    assert 0 < delta("engine_step_seconds_total") <= wall


def test_an_aborted_request_counts_as_abort_only(server, client):
    before = Scrape(server)
    stream = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=500,
                                            stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while Scrape(server)("wattserve:request_success_total", finished_reason="abort") \
            == before("wattserve:request_success_total", finished_reason="abort"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = Scrape(server)
    assert after("wattserve:e2e_request_latency_seconds_count") \
        == before("wattserve:e2e_request_latency_seconds_count")
    assert after("wattserve:slo_requests_total") == before("wattserve:slo_requests_total")


def test_slo_counters_for_requests_made_to_miss_and_to_meet(server, client):
    before = Scrape(server)
    # The server's SLO is 60 s for both; each request overrides what it needs.
    client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3,
                                   extra_body={"slo": {"ttft_ms": 0.001}})  # misses TTFT
    client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3,
                                   extra_body={"slo": {"ttft_ms": 60_000, "tpot_ms": 60_000}})
    for max_tokens in (4, 1):  # TPOT missed; then one token, which has no TPOT to miss
        resp = httpx.post(server + "/v1/completions", timeout=60, json={
            "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True,
            "slo": {"tpot_ms": 0.001}})
        assert resp.status_code == 200
    after = Scrape(server)
    delta = {name: after(f"wattserve:{name}_total") - before(f"wattserve:{name}_total")
             for name in ("slo_requests", "slo_ttft_met", "slo_tpot_met", "slo_met")}
    assert delta == {"slo_requests": 4, "slo_ttft_met": 3, "slo_tpot_met": 3, "slo_met": 2}
    # Every request of this module had an SLO and finished inside the 600 s window.
    assert after("wattserve:slo_attainment") == pytest.approx(
        after("wattserve:slo_met_total") / after("wattserve:slo_requests_total"))
    assert after("wattserve:goodput_requests_per_second") > 0
    assert after("wattserve:goodput_tokens_per_second") > 0
    assert after("wattserve:slo_ttft_seconds") == 60.0


def test_a_bad_slo_is_a_400(server):
    resp = httpx.post(server + "/v1/chat/completions", timeout=30, json={
        "messages": FRANCE, "max_tokens": 1, "slo": {"ttft_ms": -5}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "slo.ttft_ms"


VLLM_NAMES = (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
    "prompt_tokens_total", "generation_tokens_total", "request_success_total",
    "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
    "time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
    "request_queue_time_seconds_bucket", "request_prefill_time_seconds_bucket",
    "request_decode_time_seconds_bucket", "request_inference_time_seconds_bucket",
    "request_prompt_tokens_bucket", "request_generation_tokens_bucket",
    "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
)


def test_vllm_names_exist_with_a_model_name_label(server):
    scrape = Scrape(server)
    for name in VLLM_NAMES:
        assert any(s.name == "wattserve:" + name and s.labels.get("model_name") == MODEL
                   for s in scrape.samples), name
    assert 0 <= scrape("wattserve:kv_cache_usage_perc") <= 1
    assert all(s.labels.get("model_name") == MODEL for s in scrape.samples
               if s.name.startswith("wattserve:"))


def test_power_gauges_and_an_untriggered_cap(server):
    scrape = Scrape(server)
    assert scrape("wattserve:device_power_watts", device="fake0") == WATTS
    assert scrape("wattserve:device_temperature_celsius", device="fake0") == 45.0
    assert scrape("wattserve:device_sm_clock_hertz", device="fake0") == 1.5e9
    assert scrape("wattserve:device_utilization_ratio", device="fake0") == 0.5
    assert scrape("wattserve:device_energy_joules_total", device="fake0") > 0
    assert scrape("wattserve:power_average_watts") == pytest.approx(WATTS)
    assert scrape("wattserve:energy_per_output_token_joules") > 0
    assert scrape("wattserve:output_tokens_per_joule") == pytest.approx(
        1 / scrape("wattserve:energy_per_output_token_joules"))
    assert scrape("wattserve:power_cap_watts") == CAP_WATTS
    assert scrape("wattserve:power_throttle") == 0.0  # 40 W is far under the cap
    assert scrape("wattserve:scheduler_token_budget") == 2048


def test_every_dashboard_query_reads_an_exported_series(server):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"]]
    used = {name for q in queries for name in re.findall(r"wattserve:[A-Za-z0-9_:]+", q)}
    assert len(used) > 40
    assert used - Scrape(server).names == set()
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {"prometheus"}  # the data source docker/grafana/provisioning names


def test_the_flags_reach_the_server_and_monitor_configs():
    args = build_parser().parse_args([
        "serve", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50", "--power-cap-watts", "450",
        "--power-sample-interval-ms", "50", "--metrics-window-seconds", "30"])
    config = server_config(args)
    assert (config.slo_ttft_ms, config.slo_tpot_ms, config.metrics_window_seconds) == (200, 50, 30)
    assert config.default_slo().ttft_s == 0.2
    assert monitor_config(args) == MonitorConfig(power_cap_watts=450, power_sample_interval_ms=50)


def test_without_power_readings_power_metrics_are_absent_and_the_log_says_why(live_server):
    names = {line.split("{")[0] for line in httpx.get(live_server.url + "/metrics").text.splitlines()}
    assert "wattserve:device_power_watts" not in names
    assert "wattserve:inference_energy_joules_total" not in names
    assert "wattserve:gpu_busy_seconds_total" not in names  # CUDA events only on a GPU
    assert "wattserve:time_to_first_token_seconds_bucket" in names
    assert live_server.log().count("no power metrics: ") == 1
