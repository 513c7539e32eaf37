"""Quantized weights (`--quantization`) against bf16, in one run with the ceilings they meet.

1. Ceilings: a device-to-device copy (bytes/s: what batch-1 decode reads its weights at), a
   large bf16 matmul and an fp8 one (torch._scaled_mm, FLOP/s: what prefill computes at).
2. Batch-1 decode tok/s, Llama-3.1-8B shapes with random weights, for bf16, fp8 and int4
   (g128, the AWQ/GPTQ kernel path): against bf16 and against each format's roofline, the
   copy bandwidth over the weight bytes a token reads.
3. Prefill of 4,096 tokens: FLOP/s of bf16 and fp8 against the bf16 and fp8 matmul, and on
   CUDA the prefill's 12 costliest kernels (torch profiler), to show where the gap goes. Row
   fp8+normfp8 is fp8 with the norms before qkv and gate_up writing fp8 rows themselves
   (kernels/triton_quant_linear.NORM_WRITES_FP8), so one run decides that switch.
4. Perplexity on the real default model (SmolLM2-135M; its Q4_1 weights dequantized are the
   baseline), text and windows as benchmarks/kv_quality_bench.py, a window a prefill: fp8
   (W8A8, as prefill runs it), fp8 weights alone (their codes dequantized, activations
   unquantized: the rounding batch-1 decode's weight-only GEMV sees) and int4 RTN (group
   64: its hidden size 576 is no multiple of 128).

One engine per model: the formats are swapped in place (the dense weights kept aside), so the
model loads once. --tiny runs it all on CPU at toy shapes (the decode model a 2-layer Llama).

Usage: python benchmarks/weight_quant_bench.py [--tiny] [--device cpu|cuda] [--skip-speed | --skip-perplexity]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _results import write_results
from _roofline import prefill_flops, weight_bytes_per_step
from decode_profile import kernel_table
from kv_quality_bench import corpus_tokens, steps_logprobs
from llama8b_config import LLAMA31_8B, TINY_LLAMA, write_checkpoint_dir
from torch import nn

from wattserve.engine.core import EngineCore
from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.engine.weight_loading import quantize_linears, weight_formats
from wattserve.kernels import triton_quant_linear
from wattserve.kernels.weight_format import dequantize, quantize_fp8, quantize_per_token_fp8

# Speed rows: (weight format, whether the norms before fp8 linears write fp8 rows); none: the
# model's dtype (bf16 on CUDA).
SPEED_ROWS = {"none": ("none", False), "fp8": ("fp8", False), "fp8+normfp8": ("fp8", True), "int4": ("int4", False)}
# Perplexity also separates fp8's two roundings: fp8_weights is the weights' alone.
QUALITY_FORMATS = ("none", "fp8_weights", "fp8", "int4")
DECODE_GOALS = {"fp8": 1.8, "int4": 2.5}  # x bf16 tok/s, issue 20


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of fn()."""
    times = []
    for _ in range(iters + 2):  # two warm-up calls
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[iters // 2]


def ceilings(device: torch.device, tiny: bool) -> dict:
    n = 512 if tiny else 8192
    src = torch.randn((1 << 22) if tiny else (1 << 29), device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, 5)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = 2 * n**3 / timed(lambda: a @ a, device, 5)
    fp8 = None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        codes, scales = quantize_per_token_fp8(a)
        fp8 = 2 * n**3 / timed(lambda: torch._scaled_mm(codes, codes.t(), scale_a=scales, scale_b=scales.view(1, -1),
                                                         out_dtype=torch.bfloat16), device, 5)
    return {"copy_bytes_per_s": copy, "bf16_matmul_flop_per_s": bf16, "fp8_matmul_flop_per_s": fp8}


class FormatSwitch:
    """Puts one engine's decoder linears in a format, from dense weights kept aside."""

    def __init__(self, engine: EngineCore):
        self.engine = engine
        model = engine.runner.model
        self.dense = {name: m.weight.data for name, m in model.named_modules()
                      if ".layers." in f".{name}" and name.endswith("_proj")}

    def use(self, quantization: str) -> None:
        model = self.engine.runner.model
        for name, w in self.dense.items():
            module = model.get_submodule(name)
            del module.weight
            if quantization == "fp8_weights":  # dense, in the values fp8 codes hold
                w = dequantize(quantize_fp8(w), w.dtype)
            module.weight = nn.Parameter(w, requires_grad=False)
        if quantization not in ("none", "fp8_weights"):
            quantize_linears(model, quantization)
        runner = self.engine.runner
        if runner.graphs is not None:  # graphs captured with the old weights
            runner.capture_decode_graphs(self.engine.config.scheduler.max_num_seqs, self.engine.max_model_len)


def speed(llm: LLM, switch: FormatSwitch, limits: dict, prompt_len: int, new_tokens: int) -> dict:
    engine = llm.core
    prompt = list(range(1000, 1000 + prompt_len))
    rows = {}
    for row, (fmt, norm_writes_fp8) in SPEED_ROWS.items():
        triton_quant_linear.NORM_WRITES_FP8 = norm_writes_fp8  # first: read as decode graphs are captured
        switch.use(fmt)
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate([prompt[:16]], params)  # compiles this format's kernels
        (decode,) = llm.generate([prompt[:16]], params)
        llm.generate([prompt], SamplingParams(max_tokens=1))
        (prefill,) = llm.generate([prompt], SamplingParams(max_tokens=1))
        kernels = None
        if engine.device.type == "cuda":  # where the prefill's GPU time goes, kernel by kernel
            kernels = kernel_table(lambda: llm.generate([prompt], SamplingParams(max_tokens=1)), steps=2)[:12]
        step_bytes = weight_bytes_per_step(engine.runner.model)
        flops = prefill_flops(engine.runner.model, engine.model_config, prompt_len)
        matmul = limits["fp8_matmul_flop_per_s" if fmt == "fp8" else "bf16_matmul_flop_per_s"]
        rows[row] = {
            "formats": weight_formats(engine.runner.model),
            "norm_writes_fp8": norm_writes_fp8,
            "weight_bytes_per_decode_step": step_bytes,
            "decode_tok_s": 1 / decode.stats.tpot,
            "roofline_tok_s": limits["copy_bytes_per_s"] / step_bytes,
            "prefill_tokens": prompt_len,
            "prefill_s": prefill.stats.prefill_time,
            "prefill_flop_per_s": flops / prefill.stats.prefill_time,
            "prefill_vs_matmul": None if matmul is None else flops / prefill.stats.prefill_time / matmul,
            "prefill_kernels": kernels,
        }
        rows[row]["decode_vs_roofline"] = rows[row]["decode_tok_s"] / rows[row]["roofline_tok_s"]
        rows[row]["decode_vs_bf16"] = rows[row]["decode_tok_s"] / rows["none"]["decode_tok_s"]
    triton_quant_linear.NORM_WRITES_FP8 = False
    return rows


@torch.inference_mode()
def perplexities(engine: EngineCore, switch: FormatSwitch, tokens: int, window: int) -> dict:
    """Per format: perplexity, its change from the dense weights', and the mean KL from the
    dense model's next-token distribution. A window a prefill: one window's log-probabilities
    over SmolLM2's 49k vocabulary take 0.4 GB in float32, all ten of the default at once 4 GB
    a copy (the CPU run ran out of 24 GB). The dense model's stay, the KL's reference."""
    ids = corpus_tokens(engine.tokenizer, tokens)
    windows = [ids[w : w + window] for w in range(0, len(ids) - window + 1, window)]
    dense_logp = []
    rows = {}
    for fmt in QUALITY_FORMATS:
        switch.use(fmt)
        nll = kl = 0.0
        for i, win in enumerate(windows):
            (logp,) = steps_logprobs(engine, [win], window)
            targets = torch.tensor(win[1:], device=engine.device)
            nll += -logp[0, :-1].gather(1, targets[:, None]).sum().item()
            if fmt == "none":
                dense_logp.append(logp)
            kl += F.kl_div(logp, dense_logp[i], log_target=True, reduction="sum").item()
        perplexity = math.exp(nll / (len(windows) * (window - 1)))
        dense = rows["none"]["perplexity"] if rows else perplexity
        rows[fmt] = {"perplexity": perplexity, "perplexity_increase_pct": 100 * (perplexity / dense - 1),
                     "mean_kl_nats": kl / (len(windows) * window), "formats": weight_formats(engine.runner.model)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes, on CPU unless --device says otherwise")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu with --tiny, else cuda)")
    parser.add_argument("--tokens", type=int, default=None, help="perplexity: tokens scored (default 20480)")
    parser.add_argument("--window", type=int, default=None, help="perplexity: tokens per window (default 2048)")
    parser.add_argument("--tokenizer", help="tokenizer dir of the random-weight speed model "
                                            "(default: the default model's)")
    parser.add_argument("--skip-perplexity", action="store_true",
                        help="speed only: the perplexity runs the default model, which must be installed")
    parser.add_argument("--skip-speed", action="store_true",
                        help="perplexity only (runs on a CPU at the full 20,480 tokens: about 15 minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/weight_quant_<device>.json)")
    args = parser.parse_args()
    if args.skip_speed and args.skip_perplexity:
        parser.error("--skip-speed and --skip-perplexity leave nothing to run")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    tokens, window = args.tokens or (512 if args.tiny else 20480), args.window or (256 if args.tiny else 2048)
    prompt_len, new_tokens = (64, 8) if args.tiny else (4096, 128)

    limits = speeds = quality = None
    if not args.skip_speed:
        limits = ceilings(device, args.tiny)
        checkpoint = write_checkpoint_dir(config=TINY_LLAMA if args.tiny else LLAMA31_8B)
        llm = LLM(str(checkpoint), load_format="dummy", device=str(device), tokenizer=args.tokenizer, max_num_seqs=1,
                  max_num_batched_tokens=prompt_len, max_model_len=prompt_len + 16,
                  kv_cache_memory=(4 << 30) if device.type == "cuda" else (64 << 20), warm_up=False,
                  enable_prefix_caching=False)  # every run prefills its prompt, in the format of the moment
        speeds = speed(llm, FormatSwitch(llm.core), limits, prompt_len, new_tokens)
        del llm
    if not args.skip_perplexity:
        quality_engine = LLM(device=str(device), quantization="none", enforce_eager=True, max_num_seqs=1,
                             max_model_len=window, kv_cache_memory=(2 << 30) if device.type == "cuda" else (256 << 20),
                             warm_up=False).core
        quality = perplexities(quality_engine, FormatSwitch(quality_engine), tokens, window)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if speeds is not None:
        print(f"\n{name}: copy {limits['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
              f"{limits['bf16_matmul_flop_per_s'] / 1e12:.1f} TFLOP/s, fp8 matmul "
              + (f"{limits['fp8_matmul_flop_per_s'] / 1e12:.1f} TFLOP/s" if limits["fp8_matmul_flop_per_s"] else "n/a"))
        print(f"\n{'format':11} {'weights GB':>10} {'decode tok/s':>13} {'x bf16':>7} {'goal':>5} {'roofline':>9} "
              f"{'x roof':>7} {'prefill TFLOP/s':>16} {'x matmul':>9}")
        for fmt, r in speeds.items():
            vs_matmul = "n/a" if r["prefill_vs_matmul"] is None else f"{r['prefill_vs_matmul']:.2f}"
            print(f"{fmt:11} {r['weight_bytes_per_decode_step'] / 1e9:10.3f} {r['decode_tok_s']:13.1f} "
                  f"{r['decode_vs_bf16']:7.2f} {DECODE_GOALS.get(fmt, ''):>5} {r['roofline_tok_s']:9.1f} "
                  f"{r['decode_vs_roofline']:7.2f} {r['prefill_flop_per_s'] / 1e12:16.2f} {vs_matmul:>9}")
    if quality is not None:
        print(f"\nperplexity, {quality_engine.model_name}, {tokens} tokens of pydoc_data.topics in windows of {window}")
        for fmt, r in quality.items():
            print(f"{fmt:11} {r['perplexity']:9.4f} {r['perplexity_increase_pct']:+7.2f}%  KL {r['mean_kl_nats']:.2e}")
    write_results({"device": name, "tiny": args.tiny, "ceilings": limits, "decode_and_prefill": speeds,
                   "decode_goals_x_bf16": DECODE_GOALS, "perplexity": quality, "perplexity_tokens": tokens,
                   "perplexity_window": window}, "weight_quant", name, args.out)


if __name__ == "__main__":
    main()
