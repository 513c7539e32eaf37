"""Shared fixtures: the default model's tokenizer, live servers, small oracle models."""
import os

# Triton reads this when kernels are decorated, and other imports (torch, transformers) may
# import triton first: set it before anything else. CI has no GPU, so kernels run interpreted;
# TRITON_INTERPRET=0 runs them on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402


def engine_info(**overrides):
    """An EngineInfo for tests of the server's parts without an engine behind them."""
    from wattserve.engine.client import EngineInfo

    fields = dict(model_name="smol", model_path="smol.gguf", dtype="float32", device="cpu",
                  max_model_len=2048, vocab_size=49152, gpu_timed=False,
                  power_average_window_s=None, power_cap_w=None)
    return EngineInfo(**{**fields, **overrides})


@pytest.fixture(scope="session")
def tokenizer():
    from wattserve.engine.loader import default_model_path, load_tokenizer_only

    return load_tokenizer_only(default_model_path())


# ---- live wattserve servers, for tests/test_api_*.py and test_cli.py ---------------------

REPO = Path(__file__).resolve().parents[1]
# The console script, as users run it: `python -m` from the repository root would put the
# root's `kernels/` folder ahead of PyPI's `kernels` package, which transformers imports.
WATTSERVE = str(Path(sys.executable).parent / "wattserve")


class LiveServer:
    """`wattserve serve` in a subprocess on a free loopback port, logging to a file."""

    def __init__(self, args: tuple[str, ...], log_path: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # A small KV cache keeps "every block is free again" checks meaningful and quick.
        cmd = [WATTSERVE, "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--kv-cache-memory", "256MiB", *args]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """Each series' value by name, summed over its labels (model_name, finished_reason)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values: dict[str, float] = {}
        for sample, value in (line.rsplit(" ", 1) for line in text.splitlines()
                              if line.startswith("wattserve:")):
            name = sample.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
        return values

    def wait_idle(self, timeout: float = 10) -> dict[str, float]:
        """Until no request runs or waits and every KV block is free; the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = (m["wattserve:num_requests_running"] + m["wattserve:num_requests_waiting"]
                    + m["wattserve:kv_cache_blocks_used"])
            if busy == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(args: tuple[str, ...], directory: Path) -> LiveServer:
    server = LiveServer(args, directory / "server.log")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """The default model with default flags, shared by every module that needs nothing
    special: loading the model takes most of a server's start-up."""
    server = _start((), tmp_path_factory.mktemp("live_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Starts servers with extra flags, e.g. start_server("--api-key", "k"); stopped at the
    end of the module."""
    servers = []

    def start(*args: str) -> LiveServer:
        servers.append(_start(args, tmp_path_factory.mktemp("server")))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def served_model(live_server) -> str:
    return httpx.get(live_server.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="session")
def openai_client(live_server):
    from openai import OpenAI

    # No retries: a test that gets an error must see it, not a retried success.
    return OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer):
    """A small random Qwen2 (qkv bias, GQA, untied head) saved as safetensors with the
    default tokenizer: the oracle model for the safetensors path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("qwen2-oracle")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # initialized to zero: give the bias path real work
                p.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    tokenizer.hf.save_pretrained(directory)
    return directory
