"""Batch-1 greedy decode and 16-way concurrency on CPU, default model, against HF transformers;
and batch 1 served: streamed through /v1/completions of a `wattserve serve` started here.

All run the same dequantized SmolLM2-135M-Instruct weights in float32 on the same threads,
measured in the same run, the batch-1 runs alternating (HF, engine, served) so that a change
in the machine's load touches all three. Usage: python benchmarks/cpu_decode_bench.py
[--new-tokens N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from wattserve.engine.llm import LLM
from wattserve.engine.loader import default_model_path
from wattserve.engine.request import SamplingParams

RESULTS = Path(__file__).parent / "results" / "cpu_decode.json"


def engine_run(llm: LLM, prompt: list[int], batch: int, new_tokens: int) -> float:
    """Output tokens per second for `batch` identical-length requests submitted together."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    produced = sum(len(r.choices[0].token_ids) for r in llm.generate([prompt] * batch, params))
    assert produced == batch * new_tokens
    return produced / (time.perf_counter() - start)


def hf_run(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] - len(prompt) == new_tokens
    return new_tokens / (time.perf_counter() - start)


@contextmanager
def served(kv_cache_memory: str):
    """`wattserve serve` (two processes: HTTP front end and engine core) on a free loopback
    port, with this engine's settings; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    wattserve = Path(sys.executable).parent / "wattserve"
    server = subprocess.Popen([str(wattserve), "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--kv-cache-memory", kv_cache_memory, "--no-prefix-caching",
                               "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        while not _ready(url):
            assert server.poll() is None, "the server exited"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready").status_code == 200
    except httpx.TransportError:
        return False


def served_run(url: str, prompt: list[int], new_tokens: int) -> float:
    """Output tokens per second of one streamed request, from sending it to its last token."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as resp:
        chunks = [line for line in resp.iter_lines() if line.startswith("data: {")]
    elapsed = time.perf_counter() - start
    assert json.loads(chunks[-1].removeprefix("data: "))["usage"]["completion_tokens"] == new_tokens
    return new_tokens / elapsed


def medians_alternating(runs: dict, repeats: int) -> dict[str, float]:
    """Each run once as a warm-up (allocator, thread pool, first-call paths), then `repeats`
    rounds of all of them in turn; the median of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(fn())
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    # No prefix caching: every run repeats one prompt, and HF's generate computes it each time.
    llm = LLM(kv_cache_memory=256 << 20, enable_prefix_caching=False)
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    text = llm.core.tokenizer.render_chat([{"role": "user", "content": "Tell me about the history of Paris."}])
    prompt = llm.core.tokenizer.encode(text, add_special_tokens=False)

    n, r = args.new_tokens, args.repeats
    with served("256MiB") as url:
        batch1 = medians_alternating({"hf": lambda: hf_run(hf, prompt, n),
                                      "engine": lambda: engine_run(llm, prompt, 1, n),
                                      "served": lambda: served_run(url, prompt, n)}, r)
    hf_tps, one_tps, served_tps = batch1["hf"], batch1["engine"], batch1["served"]
    many_tps = medians_alternating({"many": lambda: engine_run(llm, prompt, args.concurrency, n)}, r)["many"]
    result = {
        "benchmark": "cpu_decode",
        "model": llm.core.model_name,
        "dtype": "float32",
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "hf_generate_tok_s": round(hf_tps, 2),
        "wattserve_batch1_tok_s": round(one_tps, 2),
        "wattserve_batch1_vs_hf": round(one_tps / hf_tps, 3),
        "served_batch1_tok_s": round(served_tps, 2),
        "served_batch1_vs_engine": round(served_tps / one_tps, 3),
        "served_batch1_vs_hf": round(served_tps / hf_tps, 3),
        f"wattserve_concurrent{args.concurrency}_tok_s": round(many_tps, 2),
        "concurrency_speedup_vs_batch1": round(many_tps / one_tps, 2),
        "command": "python benchmarks/cpu_decode_bench.py",
    }
    print(f"{'run':<34}{'output tok/s':>14}")
    print(f"{'HF transformers generate, batch 1':<34}{hf_tps:>14.1f}")
    print(f"{'wattserve, batch 1':<34}{one_tps:>14.1f}   ({one_tps / hf_tps:.2f}x HF)")
    print(f"{'wattserve served, batch 1':<34}{served_tps:>14.1f}   ({served_tps / one_tps:.2f}x engine, "
          f"{served_tps / hf_tps:.2f}x HF)")
    print(f"{f'wattserve, {args.concurrency} concurrent':<34}{many_tps:>14.1f}   ({many_tps / one_tps:.2f}x batch 1)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
