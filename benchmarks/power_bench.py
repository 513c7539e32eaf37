"""Energy and power on one GPU: what the server reports against NVML, and a power cap.

Random-weight Llama-3.1-8B shapes (bf16, --load-format dummy, context 8192), one in-process
engine (LLM) with the server's own power sampler, energy meter and power cap controller:

  1. batch 1: one request at a time (128-token prompt, 256 tokens out, ignore_eos).
  2. saturating: --concurrency requests always in flight (512 in, 256 out), closed loop.
  Both: joules the engine attributed to its steps against the delta of NVML's own energy
  counter over the same window (the physical reference, read in the same run; within 5%
  passes), joules per output token, tokens/s, TTFT and TPOT.
  3. capped: the saturating load under a power cap of --cap-fraction (0.7) of the uncapped
  average power; after a settling time, the measured average power against the cap (within
  5% passes) and what the cap costs in throughput and TPOT.

Prints a table and writes benchmarks/results/power_<gpu>.json. About 3-4 minutes on an H100.
Usage: python benchmarks/power_bench.py [--phase-seconds S] [--concurrency N]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from _results import write_results
from llama8b_config import write_checkpoint_dir

from wattserve.engine.energy import EnergyMeter
from wattserve.engine.power import PowerSampler
from wattserve.engine.power_cap import PowerCapController
from wattserve.engine.power_sources import open_power_source
from wattserve.engine.request import FinishReason, SamplingParams
from wattserve.engine.stats import StatsObserver



@dataclass
class Recorder(StatsObserver):
    """What the engine reported during one measured window."""

    steps: list = field(default_factory=list)
    finished: list = field(default_factory=list)

    def on_step(self, step):
        self.steps.append(step)

    def on_finished(self, request):
        if request.finish_reason != FinishReason.ABORT:
            self.finished.append(request)


def nvml_energy_j(source) -> float:
    """NVML's total energy counter of the GPU, in joules (the reference, not our estimate)."""
    return source.read()[0].energy_j


def run_load(llm, source, concurrency: int, seconds: float, prompt_len: int, output_len: int,
             gen: torch.Generator, settle_s: float = 0.0) -> dict:
    """Keep `concurrency` requests in flight for settle_s + seconds; measure the last `seconds`."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    recorder = Recorder()
    begin = time.monotonic()
    window = []  # (time, nvml J) where the measured window opens, then where it closes

    def watch(outputs) -> bool:
        now = time.monotonic()
        if not window and now >= begin + settle_s:
            llm.core.observers.append(recorder)
            window.append((now, nvml_energy_j(source)))
        elif window and now >= window[0][0] + seconds:
            window.append((now, nvml_energy_j(source)))
            llm.core.observers.remove(recorder)
            return True  # the window ends under full load, not in a draining tail: abort the rest
        return False

    prompts = (torch.randint(0, 128000, (prompt_len,), generator=gen).tolist() for _ in itertools.count())
    llm.generate(prompts, params, max_in_flight=concurrency, on_step=watch)
    (t0, j0), (t1, j1) = window
    nvml_j, elapsed = j1 - j0, t1 - t0
    attributed = sum(s.energy_j for s in recorder.steps)
    tokens = sum(s.num_generation_tokens for s in recorder.steps)
    done = recorder.finished
    return {
        "concurrency": concurrency, "prompt_tokens": prompt_len, "output_tokens": output_len,
        "seconds": round(elapsed, 2), "generated_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "requests_finished": len(done),
        "ttft_ms_median": _ms(statistics.median(r.ttft for r in done)) if done else None,
        "tpot_ms_median": _ms(statistics.median(r.tpot for r in done)) if done else None,
        "tpot_ms_mean": _ms(statistics.fmean(r.tpot for r in done)) if done else None,
        "nvml_energy_j": round(nvml_j, 1), "attributed_energy_j": round(attributed, 1),
        "attributed_vs_nvml": round(attributed / nvml_j - 1, 4),
        "energy_within_5pct": abs(attributed / nvml_j - 1) <= 0.05,
        "average_power_w": round(nvml_j / elapsed, 1),
        "j_per_output_token": round(attributed / tokens, 4),
        "j_per_output_token_nvml": round(nvml_j / tokens, 4),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-seconds", type=float, default=30, help="measured seconds per load")
    ap.add_argument("--settle-seconds", type=float, default=15,
                    help="seconds the capped load runs before it is measured")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight when saturating")
    ap.add_argument("--cap-fraction", type=float, default=0.7, help="cap / uncapped average power")
    ap.add_argument("--sample-interval-ms", type=float, default=50)
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the default model's)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/power_<gpu>.json)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("power_bench: needs a CUDA GPU and torch sees none; nothing was measured")
    source = open_power_source(torch.device("cuda"))
    if source is None or source.read()[0].energy_j is None:
        sys.exit("power_bench: NVML gives no energy counter for this GPU (the log says why); "
                 "nothing was measured")
    from wattserve.engine.llm import LLM

    llm = LLM(str(write_checkpoint_dir()), load_format="dummy", dtype="bfloat16", tokenizer=args.tokenizer,
              kv_cache_memory=8 << 30, max_num_seqs=args.concurrency, max_num_batched_tokens=4096,
              max_model_len=8192)
    core = llm.core
    sampler = PowerSampler(source, interval_s=args.sample_interval_ms / 1e3)
    sampler.start()
    core.energy_meter = EnergyMeter(sampler)
    gen = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name()
    results: dict = {"device": gpu, "torch": torch.__version__,
                     "command": "python " + " ".join(sys.argv),
                     "model": "Llama-3.1-8B shapes, random weights, bf16",
                     "energy_reference": "NVML nvmlDeviceGetTotalEnergyConsumption delta"}
    try:
        run_load(llm, source, 4, 5, 512, 64, gen)  # warm-up: kernels, allocator
        results["batch1"] = run_load(llm, source, 1, args.phase_seconds, 128, 256, gen)
        sat = run_load(llm, source, args.concurrency, args.phase_seconds, 512, 256, gen)
        results["saturating"] = sat
        cap_w = args.cap_fraction * sat["average_power_w"]
        cap = PowerCapController(core, lambda: sampler.snapshot.average_power_w, cap_w)
        core.observers.append(cap)
        capped = run_load(llm, source, args.concurrency, args.phase_seconds, 512, 256, gen,
                          settle_s=args.settle_seconds)
        capped.update({
            "cap_w": round(cap_w, 1), "power_vs_cap": round(capped["average_power_w"] / cap_w - 1, 4),
            "power_within_5pct_of_cap": abs(capped["average_power_w"] / cap_w - 1) <= 0.05,
            "throttle_at_end": round(cap.throttle, 3),
            "token_budget_at_end": core.scheduler.token_budget,
            "throughput_cost": round(1 - capped["tokens_per_s"] / sat["tokens_per_s"], 4),
            "tpot_cost": round(capped["tpot_ms_median"] / sat["tpot_ms_median"] - 1, 4)
            if capped["tpot_ms_median"] and sat["tpot_ms_median"] else None,
            "j_per_output_token_change": round(
                capped["j_per_output_token"] / sat["j_per_output_token"] - 1, 4),
        })
        results["capped"] = capped
    finally:
        sampler.stop()

    print(f"{'load':<12}{'tok/s':>9}{'avg W':>8}{'J/tok':>9}{'attrib J':>10}{'NVML J':>10}"
          f"{'diff':>8}{'TTFT ms':>9}{'TPOT ms':>9}")
    for name in ("batch1", "saturating", "capped"):
        r = results[name]
        print(f"{name:<12}{r['tokens_per_s']:>9}{r['average_power_w']:>8}{r['j_per_output_token']:>9}"
              f"{r['attributed_energy_j']:>10}{r['nvml_energy_j']:>10}{r['attributed_vs_nvml']:>8.1%}"
              f"{r['ttft_ms_median'] or '-':>9}{r['tpot_ms_median'] or '-':>9}")
    c = results["capped"]
    print(f"cap {c['cap_w']} W: measured {c['average_power_w']} W ({c['power_vs_cap']:+.1%}); "
          f"throughput {-c['throughput_cost']:+.1%}, TPOT {c['tpot_cost']:+.1%}, "
          f"J/token {c['j_per_output_token_change']:+.1%}; throttle {c['throttle_at_end']}")
    write_results(results, "power", gpu, args.out)


if __name__ == "__main__":
    main()
