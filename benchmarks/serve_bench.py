"""A load generator for any OpenAI-compatible server (wattserve, vLLM, ...), over HTTP.

Streamed /v1/completions requests with random token-id prompts (seeded) of fixed or sampled
lengths, each asking for an exact output length (`ignore_eos`, which vLLM and wattserve
accept). Arrivals are Poisson or evenly spaced at each of --request-rates (inf: all at once),
or a closed loop keeps each of --concurrency requests in flight. Per load: request, input and
output token throughput; TTFT, TPOT and ITL at p50/p90/p99; goodput (requests per second
that met both SLOs) and SLO attainment; and, where the server's /metrics exports them (ours
does, a peer's may not), joules per output token and the share of step time the GPU sat idle,
from the counters' change over the load. Prints a table and writes JSON and a PNG of the
latency percentiles against the achieved request rate.

  TTFT: request sent -> first chunk with text. ITL: between consecutive chunks with text.
  TPOT: (latency - TTFT) / (output tokens - 1), as DistServe and the server's metric define it.
  Output tokens: the usage chunk's completion_tokens (stream_options.include_usage).
  Steady output tok/s (arrivals at a finite rate, servers with our /metrics): the server's
  generated-token counter over the middle of the arrivals (from 30% to 95% of their expected
  span), which leaves out the ramp-up at the start and the tail after the last arrival.

Usage: python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 --request-rates 1,2,4,inf
Writes benchmarks/results/serve_<device>.json and .png (device: --label, default this host's).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from matplotlib.figure import Figure

RESULTS = Path(__file__).parent / "results"
PERCENTILES = (50, 90, 99)
SLO_ATTAINMENT_GOAL = 0.9
# Counters of wattserve's /metrics (server/metrics.py); a peer without them gets None.
ENGINE_ENERGY = "wattserve:inference_energy_joules_total"
DEVICE_ENERGY = "wattserve:device_energy_joules_total"
GENERATION_TOKENS = "wattserve:generation_tokens_total"
GPU_BUSY = "wattserve:gpu_busy_seconds_total"
STEP_TIME = "wattserve:engine_step_seconds_total"


@dataclass
class Result:
    """One request as the client saw it; times in seconds."""

    prompt_len: int
    expected_output_len: int
    output_tokens: int | None = None  # from the usage chunk
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None and self.output_tokens is not None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class Load:
    """Either an arrival rate (requests/s, inf: all at once) or a number kept in flight."""

    rate: float | None = None
    concurrency: int | None = None

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        return f"rate {self.rate:g}/s" if math.isfinite(self.rate) else "all at once"

    def num_prompts(self, at_least: int, arrival_seconds: float) -> int:
        if self.rate is None or not math.isfinite(self.rate):
            return at_least
        return max(at_least, math.ceil(self.rate * arrival_seconds))


async def send(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> Result:
    result = Result(len(prompt), output_len)
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a failure after the stream began comes in-band
                    result.error = str(chunk["error"])[:200]
                    break
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


def make_requests(n: int, input_len: int, output_len: int, distribution: str, vocab_size: int,
                  rng: random.Random) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; `uniform` draws each length from
    [len/2, 3len/2], so the mean stays at len."""
    def length(mean: int) -> int:
        return mean if distribution == "fixed" else rng.randint(max(1, mean // 2), mean * 3 // 2)

    return [([rng.randrange(vocab_size) for _ in range(length(input_len))], length(output_len))
            for _ in range(n)]


async def run_load(client: httpx.AsyncClient, model: str, requests: list[tuple[list[int], int]],
                   load: Load, poisson: bool, rng: random.Random) -> tuple[list[Result], float]:
    """Every request's result and the seconds from the first sent to the last finished."""
    start = time.perf_counter()
    if load.concurrency is not None:
        queue = iter(requests)

        async def worker() -> list[Result]:
            return [await send(client, model, prompt, n) for prompt, n in queue]

        per_worker = await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        results = [r for worker_results in per_worker for r in worker_results]
    else:
        tasks = []
        for i, (prompt, n) in enumerate(requests):
            if i and math.isfinite(load.rate):
                await asyncio.sleep(rng.expovariate(load.rate) if poisson else 1 / load.rate)
            tasks.append(asyncio.create_task(send(client, model, prompt, n)))
        results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


async def steady_window(client: httpx.AsyncClient, arrival_span: float) -> tuple[dict, dict, float] | None:
    """Scrapes at 30% and 95% of the arrivals' expected span: (first, second, seconds between)."""
    await asyncio.sleep(0.3 * arrival_span)
    first, t0 = await scrape(client), time.perf_counter()
    await asyncio.sleep(0.65 * arrival_span)
    second = await scrape(client)
    return (first, second, time.perf_counter() - t0) if first and second else None


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Each of our /metrics series' value by name, summed over its labels; {} for a server
    without them."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.startswith("wattserve:"):
            sample, value = line.rsplit(" ", 1)
            name = sample.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def percentiles_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    points = np.percentile(np.array(values) * 1e3, PERCENTILES)
    return {"mean": round(float(np.mean(values)) * 1e3, 2),
            **{f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, points)}}


def summarize(load: Load, results: list[Result], duration: float, before: dict, after: dict,
              window: tuple[dict, dict, float] | None, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    done = [r for r in results if r.ok]
    met = [r for r in done if r.ttft <= slo_ttft_s and (r.tpot is None or r.tpot <= slo_tpot_s)]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)

    def delta(name: str) -> float | None:
        return after[name] - before[name] if name in before and name in after else None

    def per_token(joules: float | None) -> float | None:
        tokens = delta(GENERATION_TOKENS) or output_tokens
        return round(joules / tokens, 5) if joules is not None and tokens else None

    busy, steps = delta(GPU_BUSY), delta(STEP_TIME)
    return {
        "load": load.label, "request_rate": None if load.rate is None else str(load.rate),
        "concurrency": load.concurrency, "completed": len(done), "failed": len(results) - len(done),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 4),
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_output_len for r in results),
        "input_tok_s": round(input_tokens / duration, 2),
        "output_tok_s": round(output_tokens / duration, 2),
        "steady_output_tok_s": None if window is None or GENERATION_TOKENS not in window[0] else round(
            (window[1][GENERATION_TOKENS] - window[0][GENERATION_TOKENS]) / window[2], 2),
        "ttft_ms": percentiles_ms([r.ttft for r in done]),
        "tpot_ms": percentiles_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": percentiles_ms([t for r in done for t in r.itl]),
        "goodput_req_s": round(len(met) / duration, 4),
        "slo_attainment": round(len(met) / len(results), 4),
        "energy_j_per_output_token": per_token(delta(ENGINE_ENERGY)),  # engine steps only
        "device_energy_j_per_output_token": per_token(delta(DEVICE_ENERGY)),  # idle included
        "engine_step_s": None if steps is None else round(steps, 3),
        "gpu_busy_s": None if busy is None else round(busy, 3),
        "gpu_idle_fraction": round(1 - busy / steps, 4) if busy is not None and steps else None,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def plot(runs: list[dict], slo_ttft_ms: float, slo_tpot_ms: float, title: str, path: Path) -> None:
    """Latency percentiles and SLO attainment per load, lightest first; each load's tick also
    gives the request rate it achieved (below the offered one once the server saturates)."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    x = range(len(runs))
    ticks = [f"{r['load'].removeprefix('rate ')}\n{r['request_throughput']:.2f} req/s" for r in runs]
    for ax, key, name, slo in ((axes[0, 0], "ttft_ms", "TTFT (ms)", slo_ttft_ms),
                               (axes[0, 1], "tpot_ms", "TPOT (ms)", slo_tpot_ms),
                               (axes[1, 0], "itl_ms", "ITL (ms)", None)):
        for p in PERCENTILES:
            points = [(xi, r[key][f"p{p}"]) for xi, r in zip(x, runs) if r[key]]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"p{p}")
        if slo is not None:
            ax.axhline(slo, color="red", linestyle="--", label="SLO")
        ax.set(ylabel=name, yscale="log")
        ax.legend()
    ax = axes[1, 1]
    ax.plot(x, [100 * r["slo_attainment"] for r in runs], marker="o")
    ax.axhline(100 * SLO_ATTAINMENT_GOAL, color="red", linestyle="--")
    ax.set(ylabel="requests meeting both SLOs (%)", ylim=(0, 105))
    for ax in axes.flat:
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlabel("offered load / achieved request rate")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def best_load(runs: list[dict]) -> dict | None:
    """The heaviest load (runs go lightest first) at which enough requests met the SLOs."""
    passing = [r for r in runs if r["slo_attainment"] >= SLO_ATTAINMENT_GOAL]
    if not passing:
        return None
    r = passing[-1]
    return {k: r[k] for k in ("load", "request_throughput", "goodput_req_s", "slo_attainment",
                              "output_tok_s", "gpu_idle_fraction")}


def this_host_device() -> str:
    """Where the server runs when it shares this host, as in our benchmarks."""
    import torch

    return torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="model name to send (default: the server's first)")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    loads = ap.add_mutually_exclusive_group()
    loads.add_argument("--request-rates", default="1,2,4,inf",
                       help="comma-separated requests/s to sweep, lightest first; inf: all at once")
    loads.add_argument("--concurrency", help="comma-separated numbers of requests kept in flight")
    ap.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson",
                    help="gaps between arrivals at a rate: exponential or constant")
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per load")
    ap.add_argument("--arrival-seconds", type=float, default=0,
                    help="at a finite request rate, send at least rate x this many requests, so "
                         "that arrivals last this long (a short run can miss a stall)")
    ap.add_argument("--input-len", type=int, default=512, help="prompt tokens (the mean if uniform)")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens (the mean if uniform)")
    ap.add_argument("--len-distribution", choices=["fixed", "uniform"], default="fixed")
    ap.add_argument("--vocab-size", type=int, default=32000,
                    help="prompt token ids are drawn from [0, this); the default fits Llama-family vocabularies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=500)
    ap.add_argument("--slo-tpot-ms", type=float, default=50)
    ap.add_argument("--warmup-requests", type=int, default=1,
                    help="sent together before the sweep and not counted (kernel compilation, caches)")
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds, per request")
    ap.add_argument("--label", help="the device in the results' name (default: this host's GPU, or cpu)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/serve_<label>.json); the PNG beside it")
    return ap.parse_args(argv)


async def bench(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers,
                                 timeout=httpx.Timeout(args.request_timeout),
                                 limits=httpx.Limits(max_connections=None)) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        if args.concurrency:
            loads = [Load(concurrency=int(c)) for c in args.concurrency.split(",")]
        else:
            loads = [Load(rate=float(r)) for r in args.request_rates.split(",")]
        warmup = make_requests(args.warmup_requests, args.input_len, args.output_len,
                               args.len_distribution, args.vocab_size, random.Random(-1 - args.seed))
        await run_load(client, model, warmup, Load(rate=math.inf), False, random.Random())
        runs = []
        for i, load in enumerate(loads):
            # Fresh prompts per load, so a server's prefix cache cannot serve one load from another.
            rng = random.Random(args.seed + i)
            requests = make_requests(load.num_prompts(args.num_prompts, args.arrival_seconds),
                                     args.input_len, args.output_len, args.len_distribution,
                                     args.vocab_size, rng)
            before = await scrape(client)
            window = (asyncio.create_task(steady_window(client, len(requests) / load.rate))
                      if load.rate is not None and math.isfinite(load.rate) else None)
            results, duration = await run_load(client, model, requests, load,
                                               args.arrivals == "poisson", rng)
            runs.append(summarize(load, results, duration, before, await scrape(client),
                                  window and await window, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3))
    return {"model": model, "runs": runs}


def print_table(runs: list[dict]) -> None:
    def cell(stats: dict | None, key: str) -> str:
        return "-" if stats is None else f"{stats[key]:.1f}"

    def opt(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print(f"{'load':<18}{'ok/fail':>9}{'req/s':>8}{'in tok/s':>10}{'out tok/s':>10}{'steady':>8}{'TTFT p50/p99 ms':>18}"
          f"{'TPOT p50/p99 ms':>17}{'ITL p99':>9}{'goodput':>9}{'SLO %':>7}{'J/tok':>8}{'GPU idle':>9}")
    for r in runs:
        print(f"{r['load']:<18}{r['completed']:>5}/{r['failed']:<3}{r['request_throughput']:>8.2f}"
              f"{r['input_tok_s']:>10.1f}{r['output_tok_s']:>10.1f}{opt(r['steady_output_tok_s'], '.0f'):>8}"
              f"{cell(r['ttft_ms'], 'p50') + '/' + cell(r['ttft_ms'], 'p99'):>18}"
              f"{cell(r['tpot_ms'], 'p50') + '/' + cell(r['tpot_ms'], 'p99'):>17}{cell(r['itl_ms'], 'p99'):>9}"
              f"{r['goodput_req_s']:>9.2f}{100 * r['slo_attainment']:>7.1f}"
              f"{opt(r['energy_j_per_output_token'], '.3f'):>8}{opt(r['gpu_idle_fraction'], '.1%'):>9}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    label = args.label or this_host_device()
    measured = asyncio.run(bench(args))
    runs = measured["runs"]
    result = {
        "benchmark": "serve", "device": label, "base_url": args.base_url, "model": measured["model"],
        "command": "python " + " ".join(sys.argv),
        "config": {k: getattr(args, k) for k in ("num_prompts", "arrival_seconds", "input_len", "output_len", "len_distribution",
                                                   "arrivals", "seed", "slo_ttft_ms", "slo_tpot_ms",
                                                   "warmup_requests")},
        "slo_attainment_goal": SLO_ATTAINMENT_GOAL,
        "runs": runs,
        "heaviest_load_meeting_slo": best_load(runs),
    }
    print_table(runs)
    best = result["heaviest_load_meeting_slo"]
    print(f"SLO TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms: heaviest load with "
          f"{SLO_ATTAINMENT_GOAL:.0%} meeting it: " + (best["load"] if best else "none"))
    out = Path(args.out or RESULTS / f"serve_{label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{measured['model']} on {label}: {args.num_prompts} requests/load, "
             f"{args.input_len} in / {args.output_len} out ({args.len_distribution})")
    plot(runs, args.slo_ttft_ms, args.slo_tpot_ms, title, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
