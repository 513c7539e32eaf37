"""The fused act-and-mul + per-token fp8 kernels (kernels/triton_activation.py, the W8A8
prefill's input to the down projection) against the copy bandwidth, in one run: the one-row
kernel (the default) and the pipelined one (ACT_FP8_PIPELINED), each over a small grid of
launches (and once without its instruction savings, to tell them from the pipeline's
overlap), at Llama-3.1-8B's MLP over a 4,096-token prefill (4,096 x 2 x 14,336 bf16 in,
4,096 x 14,336 fp8 codes out: 294 MB a call). The bf16 silu_and_mul, which writes 2 bytes a
value where these write 1, is timed beside them as the unfused kernel's rate.

Every kernel is first checked bit for bit against the one-row kernel and the reference
(weight_format.quantize_per_token_fp8 of the Triton activation). Calls are replayed from a
CUDA graph over buffer sets moving 2 GB a pass (kernel_bench.per_call_ms), as a model's
layers do. The fastest pipelined launch, if it beats the one-row kernel's default, is what
ACT_FP8_PIPELINED, PIPELINED_WARPS and PIPELINED_STAGES should become.

Usage: python benchmarks/act_fp8_bench.py [--tokens 4096] [--inter 14336] [--out PATH]
Writes benchmarks/results/act_fp8_<gpu>.json.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
from _results import write_results
from kernel_bench import copies_for, copy_bandwidth, per_call_ms, warm_up_gpu

from wattserve.kernels.triton_activation import (
    _act_and_mul_fp8_kernel, act_and_mul_fp8_triton, launch_act_and_mul_fp8_pipelined, silu_and_mul_triton,
)
from wattserve.kernels.triton_kv_write import native_fp8
from wattserve.kernels.triton_token_quant import empty_fp8_rows
from wattserve.kernels.weight_format import FP8_MAX, quantize_per_token_fp8

ONE_ROW_WARPS = (8, 16, 32)  # 16: the default (triton_token_quant.row_warps)
PIPELINED = list(itertools.product((16, 32), (2, 3, 4)))  # (warps, stages)


def one_row(gate_up: torch.Tensor, num_warps: int):
    """_act_and_mul_fp8_kernel at a launch of num_warps, otherwise as act_and_mul_fp8_triton."""
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    codes, scales = empty_fp8_rows(num_tokens, inter, gate_up.device)
    _act_and_mul_fp8_kernel[(num_tokens,)](
        gate_up, codes, scales, gate_up.stride(0), codes.stride(0), inter, BLOCK=triton.next_power_of_2(inter),
        GELU_TANH=False, FP8_MAX=FP8_MAX, NATIVE_FP8=native_fp8(gate_up.device), num_warps=num_warps)
    return codes, scales


def pipelined(gate_up: torch.Tensor, num_warps: int, stages: int, lean: bool = True):
    codes, scales = empty_fp8_rows(gate_up.shape[0], gate_up.shape[1] // 2, gate_up.device)
    launch_act_and_mul_fp8_pipelined(gate_up, codes, scales, False, num_warps, stages, lean)
    return codes, scales


def same_fp8(got, want) -> bool:
    return torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda: torch.randn(args.tokens, 2 * args.inter, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                               generator=gen) * 3
    fp8_bytes = args.tokens * args.inter * (2 * 2 + 1)
    bf16_bytes = args.tokens * args.inter * (2 * 2 + 2)

    warm_up_gpu()
    copy = copy_bandwidth()
    gate_up = make()
    gate_up[1] = 0  # a zero row: the scale's floor
    want = quantize_per_token_fp8(silu_and_mul_triton(gate_up))
    default = act_and_mul_fp8_triton(gate_up, False, pipelined=False)
    cases = {f"one_row w{w}": (lambda gu, w=w: one_row(gu, w)) for w in ONE_ROW_WARPS}
    cases |= {f"pipelined w{w} s{s}": (lambda gu, w=w, s=s: pipelined(gu, w, s)) for w, s in PIPELINED}
    # The pipeline alone: div_rn and Triton's activation, as the one-row kernel computes them.
    cases["pipelined w16 s3, not lean"] = lambda gu: pipelined(gu, 16, 3, lean=False)
    checks = {label: {"equals_one_row": same_fp8(fn(gate_up), default), "equals_reference": same_fp8(fn(gate_up), want)}
              for label, fn in cases.items()}
    del gate_up

    sets = [make() for _ in range(copies_for(fp8_bytes))]
    rows = {}
    for label, fn in cases.items():
        t = per_call_ms([lambda gu=gu, fn=fn: fn(gu) for gu in sets])
        rows[label] = {"ms": t, "bytes_per_s": fp8_bytes / (t * 1e-3), "of_copy": fp8_bytes / (t * 1e-3) / copy,
                       **checks[label]}
    t = per_call_ms([lambda gu=gu: silu_and_mul_triton(gu) for gu in sets])
    rows["silu_and_mul bf16 (unfused)"] = {"ms": t, "bytes_per_s": bf16_bytes / (t * 1e-3),
                                           "of_copy": bf16_bytes / (t * 1e-3) / copy}
    rows["one_row w16 (default) again"] = {"ms": per_call_ms([lambda gu=gu: one_row(gu, 16) for gu in sets])}
    del sets

    print(f"\n{name}: copy {copy / 1e12:.2f} TB/s (read + write); {args.tokens} x {args.inter} bf16, "
          f"{fp8_bytes / 1e6:.0f} MB a call")
    print(f"{'kernel':32} {'ms':>8} {'TB/s':>7} {'of copy':>8}  bit-exact (one-row, reference)")
    for label, r in rows.items():
        rate = f"{r['bytes_per_s'] / 1e12:7.2f} {r['of_copy']:8.0%}" if "bytes_per_s" in r else " " * 16
        exact = f"  {r['equals_one_row']}, {r['equals_reference']}" if "equals_one_row" in r else ""
        print(f"{label:32} {r['ms']:8.4f} {rate}{exact}")
    exact_pipelined = {k: r for k, r in rows.items()
                       if k.startswith("pipelined") and "not lean" not in k and r["equals_one_row"]}
    best = min(exact_pipelined, key=lambda k: exact_pipelined[k]["ms"], default=None)
    if best is not None:
        print(f"fastest bit-exact pipelined launch: {best}, {rows['one_row w16']['ms'] / rows[best]['ms']:.2f}x "
              "the default one-row kernel")
    write_results({"device": name, "torch": torch.__version__, "triton": triton.__version__, "tokens": args.tokens,
                   "inter": args.inter, "bytes_per_call": fp8_bytes, "copy_bytes_per_s": copy, "kernels": rows,
                   "fastest_exact_pipelined": best}, "act_fp8", name, args.out)


if __name__ == "__main__":
    main()
