"""`wattserve serve`: flags, sizes, defaults, help, start-up log, a model that cannot load."""
import argparse
import subprocess

import pytest

from conftest import WATTSERVE
from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.server.cli import add_serve_arguments, build_parser, engine_config, parse_size, server_config
from wattserve.server.state import ServerConfig


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize("text, size", [
    ("1048576", 1 << 20), ("64MiB", 64 << 20), ("2GiB", 2 << 30), ("1.5GiB", 3 << 29),
    ("500MB", 500 * 10**6), ("16 kib", 16 << 10),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "1XB", "", "MiB"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_defaults_are_the_dataclasses(monkeypatch):
    monkeypatch.delenv("WATTSERVE_API_KEY", raising=False)
    args = parse()
    assert engine_config(args) == EngineConfig()
    assert server_config(args) == ServerConfig()


def test_every_flag_reaches_its_config(monkeypatch):
    monkeypatch.setenv("WATTSERVE_API_KEY", "from-env")
    args = parse(
        "model.gguf", "--load-format", "gguf", "--dtype", "bfloat16", "--device", "cuda:1",
        "--tokenizer", "tok", "--seed", "7", "--block-size", "32", "--kv-cache-memory", "2GiB",
        "--gpu-memory-utilization", "0.5", "--kv-cache-dtype", "fp8_e4m3", "--no-prefix-caching", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512", "--max-model-len", "4096", "--max-queue-len", "3",
        "--host", "127.0.0.1", "--port", "9000", "--served-model-name", "a", "b",
        "--request-timeout", "2.5", "--max-request-bytes", "4MiB",
        "--shutdown-grace-seconds", "5", "--log-level", "debug")
    assert engine_config(args) == EngineConfig(
        model="model.gguf", load_format="gguf", dtype="bfloat16", device="cuda:1",
        tokenizer="tok", seed=7,
        cache=CacheConfig(block_size=32, kv_cache_memory=2 << 30, memory_fraction=0.5,
                          kv_cache_dtype="fp8_e4m3", enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512,
                                  max_model_len=4096, max_queue_len=3))
    assert server_config(args) == ServerConfig(
        host="127.0.0.1", port=9000, api_key="from-env", served_model_names=["a", "b"],
        request_timeout=2.5, max_request_bytes=4 << 20, shutdown_grace_seconds=5,
        log_level="debug")
    assert server_config(parse("--api-key", "flag")).api_key == "flag"


def test_every_flag_is_explained():
    done = subprocess.run([WATTSERVE, "serve", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    for action in serve._actions:
        assert action.help and len(action.help) > 10, action.dest
        for flag in action.option_strings:
            assert flag in done.stdout


def test_startup_log_tells_what_is_served(live_server):
    log = live_server.log()
    for needle in ("SmolLM2-135M-Instruct", "float32", "on cpu", "KV cache auto: ",
                   " blocks x 16 tokens", "context ", f"curl http://127.0.0.1:{live_server.port}/v1/models"):
        assert needle in log


def test_a_model_that_cannot_load_is_a_clean_error(tmp_path):
    missing = tmp_path / "missing.gguf"
    done = subprocess.run([WATTSERVE, "serve", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot load the model" in done.stderr and "Traceback" not in done.stderr
