"""The served path against the engine alone: reads the JSON that offline_bench.py and
serve_bench.py wrote in one run of serve_gpu.sh (same device, same workload) and reports, per
request rate, served output tok/s as a fraction of offline's (over the whole run and in the
steady middle of the arrivals, see serve_bench.py), the GPU's idle share of step
time, and whether the SLO curve is monotonic (no rate failing between two that pass).

Usage: python benchmarks/serve_vs_offline.py [--device LABEL]
"""
from __future__ import annotations

import argparse
import json

import torch
from _results import RESULTS, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="the label in the results' names (default: this host's GPU)")
    args = ap.parse_args()
    label = args.device or torch.cuda.get_device_name()
    offline = json.loads((RESULTS / f"offline_{label.replace(' ', '_')}.json").read_text())
    serve = json.loads((RESULTS / f"serve_{label.replace(' ', '_')}.json").read_text())
    engine_tok_s = offline["wattserve"]["output_tok_s"]
    rows = []
    print(f"engine alone (offline_bench): {engine_tok_s:,.0f} output tok/s")
    print(f"{'load':<16}{'out tok/s':>11}{'vs offline':>12}{'steady':>9}{'vs offline':>12}{'GPU idle':>10}"
          f"{'SLO met':>9}")
    for run in serve["runs"]:
        met = run["slo_attainment"] >= serve["slo_attainment_goal"]
        steady = run.get("steady_output_tok_s")
        rows.append({"load": run["load"], "output_tok_s": run["output_tok_s"],
                     "vs_offline": round(run["output_tok_s"] / engine_tok_s, 3),
                     "steady_output_tok_s": steady,
                     "steady_vs_offline": None if steady is None else round(steady / engine_tok_s, 3),
                     "gpu_idle_fraction": run["gpu_idle_fraction"], "slo_met": met})
        idle, steady_ratio = run["gpu_idle_fraction"], rows[-1]["steady_vs_offline"]
        print(f"{run['load']:<16}{run['output_tok_s']:>11,.0f}{rows[-1]['vs_offline']:>12.2f}"
              f"{'-' if steady is None else format(steady, ',.0f'):>9}"
              f"{'-' if steady_ratio is None else format(steady_ratio, '.2f'):>12}"
              f"{'-' if idle is None else format(idle, '.1%'):>10}{'yes' if met else 'no':>9}")
    passed = [row["slo_met"] for row in rows if row["load"] != "all at once"]
    monotonic = passed == sorted(passed, reverse=True)
    steady = [r["steady_vs_offline"] for r in rows if r["steady_vs_offline"] is not None]
    print(f"saturation: {max(r['vs_offline'] for r in rows):.2f}x offline over whole runs, "
          f"{max(steady, default=float('nan')):.2f}x in the steady window; SLO curve "
          f"{'monotonic' if monotonic else 'NOT monotonic'}; heaviest load meeting it: "
          f"{serve['heaviest_load_meeting_slo']}")
    write_results({"benchmark": "serve_vs_offline", "device": label,
                   "offline_output_tok_s": engine_tok_s,
                   "offline_first_vs_last": offline.get("first_vs_last_output_tok_s"),
                   "saturation_vs_offline": max(r["vs_offline"] for r in rows),
                   "steady_saturation_vs_offline": max(steady, default=None),
                   "slo_curve_monotonic": monotonic,
                   "heaviest_load_meeting_slo": serve["heaviest_load_meeting_slo"], "runs": rows},
                  "serve_vs_offline", label)


if __name__ == "__main__":
    main()
