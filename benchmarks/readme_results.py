"""Renders the README's measured-results tables from benchmarks/results/*.json, so that every
figure in them is a key of a result file and a rerun of a benchmark updates the README.

Each row names the command that measured it and the JSON it is read from. The tables replace
the text between BEGIN and END in README.md; tests/test_readme_results.py runs --check.

Usage: python benchmarks/readme_results.py           (rewrites README.md in place)
       python benchmarks/readme_results.py --check   (exit 1 and print a diff if it differs)
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

from _results import RESULTS

README = Path(__file__).parent.parent / "README.md"
BEGIN = ("<!-- results:begin: rendered by benchmarks/readme_results.py from benchmarks/results/*.json; "
         "rerun it, do not edit -->")
END = "<!-- results:end -->"
H100, H200 = "NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"
HEADER = "| what | result | limit or peer in the same run | measured by -> read from |\n|---|---|---|---|"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def tok_s(x: float) -> str:
    return f"{x:,.0f} tok/s" if x >= 100 else f"{x:#.3g} tok/s"


def ratio(x: float) -> str:
    """Three significant digits, zeros kept: 0.957, 1.00, 12.8."""
    return f"{x:#.3g}"


def pct(x: float, sign: bool = False, decimals: int = 1) -> str:
    return f"{x * 100:{'+' if sign else ''}.{decimals}f}%"


def row(what: str, result: str, limit: str, command: str, *files: str) -> str:
    sources = ", ".join(f"`{f}`" for f in files)
    command = re.sub(r"--tokenizer \S+", "--tokenizer DIR", command)  # a path on the machine that ran it
    return f"| {what} | {result} | {limit} | `{command}` -> {sources} |"


# ---- CPU -----------------------------------------------------------------------------------
def cpu_decode() -> list[str]:
    d = load("cpu_decode.json")
    return [row(f"batch-1 greedy decode, {d['model']}, {d['device']}",
                f"{tok_s(d['wattserve_batch1_tok_s'])} in process, {tok_s(d['served_batch1_tok_s'])} served "
                f"({ratio(d['served_batch1_vs_engine'])} of in process); 16 concurrent: "
                f"{tok_s(d['wattserve_concurrent16_tok_s'])}",
                f"HF `generate` {tok_s(d['hf_generate_tok_s'])} (served at {ratio(d['served_batch1_vs_hf'])}x)",
                d["command"], "cpu_decode.json")]


# ---- H100 ----------------------------------------------------------------------------------
def h100_decode_and_prefill() -> list[str]:
    profile, e2e = f"decode_profile_{H100}.json", f"gpu_e2e_{H100}.json"
    p, prefill = load(profile), load(e2e)["prefill_4096"]
    return [row("batch-1 decode", tok_s(p["engine_tok_s"]),
                f"{tok_s(p['roofline_tok_s'])} copy-bandwidth roofline", p["command"], profile),
            row("prefill of 4,096 tokens", f"{prefill['tflops']:.0f} TFLOP/s",
                f"{ratio(prefill['fraction_of_matmul'])} of a bf16 matmul ({prefill['matmul_tflops']:.0f} TFLOP/s)",
                load(e2e)["command"], e2e)]


def offline(name: str) -> list[str]:
    d = load(name)
    shape = f"{d['num_requests']} x ({d['input_len']} in, {d['output_len']} out)"
    peers = [f"{ratio(d['fraction_of_bound'])} of the bound ({tok_s(d['bound']['output_tok_s'])})"]
    if d["vs_hf"] is not None:
        peers.insert(0, f"{ratio(d['vs_hf'])}x HF `generate_batch` ({tok_s(d['hf_generate_batch']['output_tok_s'])})")
    if "first_vs_last_output_tok_s" in d:
        peers.append(f"first batch after start at {ratio(d['first_vs_last_output_tok_s'])}x the last")
    return [row(f"offline, {shape}",
                f"{tok_s(d['wattserve']['output_tok_s'])} output, GPU idle "
                f"{pct(d['wattserve']['gpu_idle_fraction_of_step_time'])}",
                "; ".join(peers), d["command"], name)]


def h100_prefix_cache() -> list[str]:
    name = f"prefix_cache_{H100}.json"
    d = load(name)
    runs = d["runs"]
    return [row(f"prefix cache, {d['num_requests']} requests sharing {d['prefix_len']:,} tokens",
                f"mean TTFT {runs['prefix_cache']['mean_ttft_s']:.2f} s",
                f"{runs['no_cache']['mean_ttft_s']:.2f} s without the cache ({ratio(d['mean_ttft_speedup'])}x); "
                f"{ratio(d['tokens_processed_ratio'])}x fewer tokens run", d["command"], name)]


def slo(serve: dict) -> str:
    c = serve["config"]
    return f"TTFT <= {c['slo_ttft_ms']} ms and TPOT <= {c['slo_tpot_ms']} ms"


def h100_online() -> list[str]:
    name = f"serve_{H100}.json"
    d = load(name)
    best = d["heaviest_load_meeting_slo"]
    return [row(f"online, {d['config']['input_len']} in / {d['config']['output_len']} out, "
                "before the engine had its own process",
                f"{best['load']} offered with {pct(best['slo_attainment'])} in {slo(d)}, "
                f"{tok_s(best['output_tok_s'])} output, GPU idle {pct(best['gpu_idle_fraction'])}",
                "", d["command"].split(" --base-url")[0], name)]


# ---- H200 ----------------------------------------------------------------------------------
SERVE_GPU = "benchmarks/serve_gpu.sh DIR 16,32,48,64,inf 30 2048"


def h200_served_path() -> list[str]:
    ratios_name, serve_name, offline_name = (f"serve_vs_offline_{H200}.json", f"serve_{H200}.json",
                                             f"offline_{H200}.json")
    r, serve = load(ratios_name), load(serve_name)
    best = r["heaviest_load_meeting_slo"]
    idle = " / ".join(f"{run['load']} {pct(run['gpu_idle_fraction'])}" for run in r["runs"])
    offline_idle = load(offline_name)["wattserve"]["gpu_idle_fraction_of_step_time"]
    return [row("online at saturation, served output tok/s over offline's",
                f"{ratio(r['saturation_vs_offline'])} over the whole run, "
                f"{ratio(r['steady_saturation_vs_offline'])} in the steady window",
                f"offline {tok_s(r['offline_output_tok_s'])}", SERVE_GPU, ratios_name),
            row(f"online, at least {serve['config']['arrival_seconds']:.0f} s of Poisson arrivals per rate",
                f"{best['load']} offered with {pct(best['slo_attainment'])} in {slo(serve)}, "
                f"{tok_s(best['output_tok_s'])} output, goodput {best['goodput_req_s']:.1f} req/s",
                "SLO curve monotonic" if r["slo_curve_monotonic"] else "SLO curve not monotonic",
                SERVE_GPU, ratios_name, serve_name),
            row("GPU idle share of step time, per load", idle, f"offline {pct(offline_idle)}",
                SERVE_GPU, ratios_name, offline_name)]


def h200_power() -> list[str]:
    name = f"power_{H200}.json"
    d = load(name)

    def energy(run: dict) -> str:
        return (f"{run['j_per_output_token']:.3g} J/output token at {tok_s(run['tokens_per_s'])}, "
                f"{run['average_power_w']:.0f} W")

    capped = d["capped"]
    return [row("energy, batch 1", energy(d["batch1"]),
                f"attributed vs NVML energy {pct(d['batch1']['attributed_vs_nvml'], True, 2)}", d["command"], name),
            row(f"energy, {d['saturating']['concurrency']} concurrent", energy(d["saturating"]),
                f"attributed vs NVML energy {pct(d['saturating']['attributed_vs_nvml'], True, 2)}",
                d["command"], name),
            row(f"power cap {capped['cap_w']:.0f} W, {capped['concurrency']} concurrent",
                f"{capped['average_power_w']:.0f} W ({pct(capped['power_vs_cap'], sign=True)} vs the cap), "
                f"{tok_s(capped['tokens_per_s'])}",
                f"vs uncapped: throughput {pct(-capped['throughput_cost'], sign=True)}, TPOT "
                f"{pct(capped['tpot_cost'], sign=True)}, J/token {pct(capped['j_per_output_token_change'], sign=True)}",
                d["command"], name)]


def h200_structured() -> list[str]:
    name = f"structured_{H200}.json"
    d = load(name)
    c = d["compile"]
    return [row(f"json_schema, {d['num_requests']} requests x {d['output_len']} tokens",
                f"{ratio(d['json_schema_vs_unconstrained'])} of unconstrained output tok/s; "
                f"masks {d['mask_ms_per_step']} ms a step", "the same batch unconstrained", d["command"], name),
            row("grammar compile", f"new schema {c['new_schema_s'] * 1e3:.1f} ms, cached {c['cached_s'] * 1e3:.2f} ms",
                f"first ever {c['first_ever_s'] * 1e3:.0f} ms", d["command"], name)]


def h200_moe() -> list[str]:
    name = f"moe_{H200}.json"
    d = load(name)
    dec, off = d["decode_batch_1"], d["offline"]
    return [row(f"MoE batch-1 decode, {d['model']}", tok_s(dec["decode_tok_s"]),
                f"{ratio(dec['fraction_of_roofline'])} of the active-weight roofline ({tok_s(dec['roofline_tok_s'])})",
                d["command"], name),
            row(f"MoE offline, {off['num_requests']} x ({off['input_len']} in, {off['output_len']} out)",
                f"{tok_s(off['output_tok_s'])} output",
                f"{ratio(off['fraction_of_bound'])} of the bound ({tok_s(off['bound_output_tok_s'])})",
                d["command"], name)]


def h200_weight_quant() -> list[str]:
    name = f"weight_quant_{H200}.json"
    command = "python benchmarks/weight_quant_bench.py --tokenizer DIR --skip-perplexity"
    rows = []
    for fmt, r in load(name)["decode_and_prefill"].items():
        label = "bf16" if fmt == "none" else fmt
        rows.append(row(f"weights {label}: batch-1 decode; prefill of {r['prefill_tokens']:,} tokens",
                        f"{tok_s(r['decode_tok_s'])} ({ratio(r['decode_vs_bf16'])}x bf16); "
                        f"prefill {r['prefill_flop_per_s'] / 1e12:.0f} TFLOP/s",
                        f"{ratio(r['decode_vs_roofline'])} of its roofline ({tok_s(r['roofline_tok_s'])}); "
                        f"prefill {ratio(r['prefill_vs_matmul'])} of a {'fp8' if fmt.startswith('fp8') else 'bf16'} matmul",
                        command, name))
    return rows


# NVIDIA's published TensorRT-LLM throughput, Llama-3.1-8B FP8 on one H200, output tok/s by
# (input, output) length (issue 20 quotes them as the peer for these shapes).
TENSORRT_LLM_H200 = {(2048, 128): 3538, (1000, 1000): 17744}


def h200_trtllm_shapes() -> list[str]:
    rows = []
    for shape in TENSORRT_LLM_H200:
        name = f"offline_trtllm_{shape[0]}_{shape[1]}_{H200}.json"
        d, peer = load(name), TENSORRT_LLM_H200[shape]
        ours = d["wattserve"]
        kv = "bf16" if d["kv_cache_dtype"] == "auto" else d["kv_cache_dtype"]
        rows.append(row(f"offline, fp8 weights, {kv} KV, {d['num_requests']} x "
                        f"({d['input_len']} in, {d['output_len']} out)",
                        f"{tok_s(ours['output_tok_s'])} output in {ours['seconds']:.0f} s, "
                        f"{ours['preemptions']} preemptions",
                        f"{ratio(ours['output_tok_s'] / peer)}x TensorRT-LLM's published {tok_s(peer)}",
                        d["command"], name))
    return rows


def h200_quant_gemv() -> list[str]:
    name = f"quant_gemv_{H200}.json"
    d = load(name)
    rows = []
    # int4 rows come in both GEMV variants since the packed-bf16 one (older results: float32 only)
    for fmt, variant in dict.fromkeys((r["format"], r.get("variant", "float32")) for r in d["rows"]):
        mine = [r for r in d["rows"] if (r["format"], r.get("variant", "float32")) == (fmt, variant)]
        weights = fmt if variant == "float32" else f"{fmt} (packed-bf16 GEMV)"

        def span(key: str) -> str:
            values = [r[key] for r in mine]
            return f"{ratio(min(values))}-{ratio(max(values))}"
        rows.append(row(f"batch-1 decode GEMV, {weights} weights, the 4 layer matrices",
                        f"{span('gemv_x_copy')} of copy bandwidth; {span('gemv_x_bf16')}x the bf16 GEMV",
                        f"the tensor-core kernel decode took before: {span('tensor_core_x_copy')} of copy",
                        d["command"], name))
    return rows


def render() -> str:
    def table(intro: str, *groups: list[str]) -> str:
        return "\n".join([intro, "", HEADER, *(line for group in groups for line in group)])

    return "\n\n".join([
        BEGIN,
        table("On CPU:", cpu_decode()),
        table("On one H100, Llama-3.1-8B shapes, random bf16 weights:",
              h100_decode_and_prefill(), offline(f"offline_{H100}.json"), h100_prefix_cache(), h100_online()),
        table("On one H200 with the engine core in its own process, Llama-3.1-8B shapes, random bf16 weights "
              "unless the row names other shapes; online and offline rows run 512 in / 128 out, 2,048-token steps:",
              h200_served_path(), offline(f"offline_{H200}.json"), h200_power(), h200_structured(), h200_moe(),
              h200_weight_quant(), h200_quant_gemv(), h200_trtllm_shapes()),
        END,
    ])


def with_results(readme: str) -> str:
    """The README with the text from BEGIN to END (both included) replaced by render()."""
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + render() + readme[end:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff if README.md differs from the rendering")
    args = ap.parse_args()
    current = README.read_text()
    rendered = with_results(current)
    if not args.check:
        README.write_text(rendered)
        return
    if rendered != current:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                   "README.md", "rendered"))
        sys.exit(1)


if __name__ == "__main__":
    main()
