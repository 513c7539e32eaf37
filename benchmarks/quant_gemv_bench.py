"""Batch-1 decode matmuls over quantized weights, each against the copy bandwidth measured in
the same run: the bytes a matrix stores over the time its product with one row takes.

Llama-3.1-8B's four layer matrices, random weights, in each format a checkpoint brings
(fp8 per channel, int4 group 128 as AWQ/GPTQ, GGUF Q4_0 as int4 group 32, GGUF Q8_0), by:
  - kernels/triton_quant_gemv.py (CUDA cores), each of a grid of tile configs with --sweep,
    else its default; int4 formats in both its variants (`U4_BF16X2`): float32 products
    ("float32") and packed bf16 pairs ("bf16x2", a row of its own, with its speed-up over the
    float32 row, "x f32"), so one run decides the switch;
  - kernels/triton_quant_linear.py's dequantize-in-the-loop kernel at its decode tile (tensor
    cores), the path decode took before;
  - bf16 through kernels/triton_gemv.py, the unquantized baseline.
Each matmul is timed as CUDA-graph replays over copies of its weight rotated past the L2, so
no call finds its weight cached.

Usage: python benchmarks/quant_gemv_bench.py [--sweep] [--formats fp8,int4_g128]     (CUDA)
       python benchmarks/quant_gemv_bench.py --tiny          (CPU interpreter, toy shapes)
Writes benchmarks/results/quant_gemv_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from wattserve.kernels.triton_interpreter import fix_loop_bounds

    fix_loop_bounds()

from _results import write_results  # noqa: E402
from _roofline import copy_bandwidth, graph_time  # noqa: E402

from wattserve.kernels import triton_quant_gemv  # noqa: E402
from wattserve.kernels.triton_gemv import gemv_triton  # noqa: E402
from wattserve.kernels.triton_quant_gemv import default_config, gemv_fits, quant_gemv_triton  # noqa: E402
from wattserve.kernels.triton_quant_linear import GEMV_CONFIG, quant_matmul_triton  # noqa: E402
from wattserve.kernels.weight_format import QuantizedWeight, quantize_fp8, quantize_int4  # noqa: E402

MATRICES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
            "down_proj": (4096, 14336)}
TINY_MATRICES = {"square": (64, 256), "wide": (96, 512)}
VARIANTS = ("float32", "bf16x2")  # the u4 GEMV's, by triton_quant_gemv.U4_BF16X2
SWEEP = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (512, 1024, 2048) for w in (2, 4, 8)]


def q8_0(w: torch.Tensor) -> QuantizedWeight:
    """GGUF Q8_0's layout: int8 codes, a float16 scale per 32 columns."""
    g = w.float().reshape(w.shape[0], -1, 32)
    scales = (g.abs().amax(-1) / 127).clamp(min=1e-8)
    codes = (g / scales[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(w.shape)
    return QuantizedWeight("i8", codes, scales.half(), 32, source="gguf Q8_0")


FORMATS = {"fp8": quantize_fp8, "int4_g128": lambda w: quantize_int4(w, 128),
           "q4_0_g32": lambda w: quantize_int4(w, 32), "q8_0": q8_0}


def stored_bytes(w: QuantizedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.codes, w.scales, w.offsets) if t is not None)


def best_configs(rows: list[dict]) -> dict:
    """Per format and GEMV variant, the swept config whose times summed over the matrices are
    least: one config per kind serves every layer."""
    best = {}
    for fmt in dict.fromkeys(f"{r['format']} {r['variant']}" for r in rows):
        totals: dict[str, float] = {}
        for r in rows:
            if f"{r['format']} {r['variant']}" == fmt:
                for config, us in r["gemv_us_by_config"].items():
                    totals[config] = totals.get(config, 0.0) + us
        best[fmt] = min(totals, key=totals.get)
    return best


def timer(device: torch.device, copies: int):
    """Seconds per call of fn(i), i picking the weight copy: graph replays on CUDA."""
    if device.type == "cuda":
        return lambda fn: graph_time(fn, reps=max(copies, 8))

    def eager(fn):
        fn(0)
        start = time.perf_counter()
        fn(1 % copies)
        return time.perf_counter() - start
    return eager


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy shapes on CPU (Triton's interpreter)")
    ap.add_argument("--sweep", action="store_true", help="time the GEMV over a grid of tile configs")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/quant_gemv_<device>.json)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bw = copy_bandwidth(device)
    print(f"{label}: copy {bw / 1e12:.3f} TB/s")
    rows = []
    print(f"{'matrix':<14}{'format':<11}{'variant':<9}{'rows':>5}{'GEMV us':>9}{'x copy':>8}{'TC us':>9}"
          f"{'x copy':>8}{'bf16 us':>9}{'x bf16':>8}{'x f32':>8}  config")
    for name, (n, k) in (TINY_MATRICES if args.tiny else MATRICES).items():
        dense = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
        copies = 1 if args.tiny else max(2, -(-(200 << 20) // (n * k * 2)))  # past the L2
        dense_copies = [dense] + [dense.clone() for _ in range(copies - 1)]
        time_of = timer(device, copies)
        for fmt in args.formats.split(","):
            quantize = FORMATS[fmt]
            weights = [quantize(d) for d in dense_copies]
            nbytes = stored_bytes(weights[0])
            for m in (1,):
                x = torch.randn(m, k, device=device, dtype=dtype)
                bf16 = float("nan")  # CPU: float32, which the bf16 GEMV does not take
                if device.type == "cuda":
                    bf16 = time_of(lambda i: gemv_triton(x, dense_copies[i % copies]))
                tensor_cores = time_of(lambda i: quant_matmul_triton(x, weights[i % copies], GEMV_CONFIG))
                for variant in VARIANTS if weights[0].kind == "u4" else VARIANTS[:1]:
                    # read at each call (and at a CUDA graph's capture) and by default_config; the
                    # variant takes bf16 x only
                    triton_quant_gemv.U4_BF16X2 = variant == "bf16x2"
                    configs = SWEEP if args.sweep else [default_config(weights[0])]
                    xv = x.bfloat16() if variant == "bf16x2" else x
                    timings = {config: time_of(lambda i: quant_gemv_triton(xv, weights[i % copies], config))
                               for config in configs if gemv_fits(xv, weights[0], config)}
                    best = min(timings, key=timings.get)
                    best_t = timings[best]
                    rows.append({"matrix": name, "format": fmt, "variant": variant, "rows": m, "stored_bytes": nbytes,
                                 "gemv_us": round(best_t * 1e6, 2), "gemv_x_copy": round(nbytes / best_t / bw, 3),
                                 "gemv_config": best,
                                 "gemv_us_by_config": {str(c): round(t * 1e6, 2) for c, t in timings.items()},
                                 "tensor_core_us": round(tensor_cores * 1e6, 2),
                                 "tensor_core_x_copy": round(nbytes / tensor_cores / bw, 3),
                                 "bf16_us": round(bf16 * 1e6, 2), "gemv_x_bf16": round(bf16 / best_t, 2)})
                    r = rows[-1]
                    if variant == "bf16x2":  # the speed-up over the float32 variant's row just above
                        r["x_float32_variant"] = round(rows[-2]["gemv_us"] / r["gemv_us"], 3)
                    print(f"{name:<14}{fmt:<11}{variant:<9}{m:>5}{r['gemv_us']:>9}{r['gemv_x_copy']:>8}"
                          f"{r['tensor_core_us']:>9}{r['tensor_core_x_copy']:>8}{r['bf16_us']:>9}{r['gemv_x_bf16']:>8}"
                          f"{r.get('x_float32_variant', ''):>8}  {best}", flush=True)
                triton_quant_gemv.U4_BF16X2 = False
    best = best_configs(rows) if args.sweep else None
    if best:
        print("the config of least total time over the matrices, by format:", best)
    write_results({"benchmark": "quant_gemv", "device": label, "torch": torch.__version__, "tiny": args.tiny,
                   "command": "python " + " ".join(sys.argv), "copy_bytes_s": bw, "best_config_by_format": best, "rows": rows},
                  "quant_gemv", label, args.out)


if __name__ == "__main__":
    main()
