"""What if the KV cache were quantized another way? Answer quality of a scheme before building it.

Runs the real default model over windows of `pydoc_data.topics` in one pass per scheme, with
each layer's attention replaced by one that reads K and V through the scheme's quantizer
(the kernels/kv_quant.py encodings: quantize, then dequantize) exactly where a served
request's decode steps would read them quantized: a query reads every earlier position from
the quantized cache, except, for KIVI schemes, its sequence's positions past the last full
block (the full-precision residual), plus any extra full-precision `residual` blocks and the
first `sink` positions a scheme names (at full precision, or at `sink_bits`). Reports
perplexity and KL divergence against the unquantized cache, as benchmarks/kv_quality_bench.py does for the built formats (that bench,
through the engine and its kernels, is the measurement of record; this one is for choosing
what to build). CPU, float32: about 30 s per scheme at the defaults.

Usage: python benchmarks/kv_quant_what_if.py [--windows 4] [--window 1024] [--schemes a,b]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from kv_quality_bench import corpus_tokens

from wattserve.engine.llm import LLM
from wattserve.kernels.dispatch import REFERENCE_OPS, Ops
from wattserve.kernels.kv_quant import (
    FP8_MAX,
    stored_scale,
    dequantize_fp8,
    dequantize_per_channel,
    dequantize_per_token,
    quantize_fp8,
    quantize_per_channel,
    quantize_per_token,
)
from wattserve.kernels.kv_rotation import rotation
from wattserve.kernels.rotary import apply_rotary_ref, norm_heads_ref

RESULTS = Path(__file__).parent / "results"
KIVI_BLOCK = 64


def per_token(bits: int, group: int | None = None):
    def fake(x):  # x [W, L, heads, d]; one range per token and group of channels
        g = group or x.shape[-1]
        xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
        return dequantize_per_token(*quantize_per_token(xg, bits), bits).reshape(x.shape)
    return fake


def per_channel(bits: int):
    def fake(x):  # one range per channel over each block of KIVI_BLOCK tokens
        w, length, h, d = x.shape
        blocks = x.reshape(w * length // KIVI_BLOCK, KIVI_BLOCK, h, d)
        out = [dequantize_per_channel(*quantize_per_channel(b, bits), bits) for b in blocks]
        return torch.stack(out).reshape(x.shape)
    return fake


def fp8(x):
    return dequantize_fp8(*quantize_fp8(x))


def fp8_absmax_scale(x):  # fp8 before its scale search: the largest magnitude onto 448
    s = stored_scale(x.abs().amax(-1) / FP8_MAX)[..., None]
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


@dataclass(frozen=True)
class Scheme:
    k: object  # quantizer of K, [W, L, heads, d] -> same, or None: full precision
    v: object
    kivi: bool = False  # positions past the last full block read in full precision
    rotated: bool = False  # K and V rotated per head first (kernels/kv_rotation.py)
    residual: int = 0  # extra full-precision blocks before the partial one (KIVI's R)
    sink: int = 0  # first positions read in full precision (or at sink_bits)
    sink_bits: int = 0  # the sink's per-token integer bits (0: full precision)


SCHEMES = {
    "fp8_e4m3": Scheme(fp8, fp8, rotated=True),
    "fp8_e4m3_unrotated": Scheme(fp8, fp8),
    "fp8_e4m3_absmax_scale": Scheme(fp8_absmax_scale, fp8_absmax_scale, rotated=True),
    "fp8_e4m3_absmax_scale_unrotated": Scheme(fp8_absmax_scale, fp8_absmax_scale),
    "int8": Scheme(per_token(8), per_token(8)),
    "int4": Scheme(per_channel(4), per_token(4), kivi=True),
    "int4_rotated": Scheme(per_channel(4), per_token(4), kivi=True, rotated=True),
    # int2 as built (kernels/kv_format.py): a ring of 2 residual blocks, position 0 at int8.
    "int2": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True, residual=1, sink=1, sink_bits=8),
    # The steps to it, from KIVI with rotation alone.
    "int2_rotated_only": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True),
    "int2_unrotated": Scheme(per_channel(2), per_token(2), kivi=True),
    "int2_keys_only": Scheme(per_channel(2), None, kivi=True, rotated=True),
    "int2_values_only": Scheme(None, per_token(2), kivi=True, rotated=True),
    "int2_v_groups_32": Scheme(per_channel(2), per_token(2, 32), kivi=True, rotated=True),
    "int2_sink_4": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True, sink=4),
    "int2_residual_1": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True, residual=1),
    "int2_residual_2": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True, residual=2),
    "int2_sink_1_residual_1": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True, sink=1, residual=1),
    "int2_sink_4_residual_1": Scheme(per_channel(2), per_token(2), kivi=True, rotated=True, sink=4, residual=1),
}


def quantized_positions(scheme: Scheme, length: int) -> torch.Tensor:
    """[L, L] True where query position t reads key position t' quantized."""
    t = torch.arange(length)
    if scheme.kivi:
        end = (t // KIVI_BLOCK - scheme.residual) * KIVI_BLOCK  # quantized: t' < end
    else:
        end = t + 1
    return (t[None, :] < end[:, None]) & (t[None, :] >= (0 if scheme.sink_bits else scheme.sink))


class WhatIfAttention:
    """The model's rotary_write_kv and paged_attention ops, over one batch of whole windows."""

    def __init__(self, windows: int, length: int):
        self.windows, self.length = windows, length
        self.scheme: Scheme | None = None
        self.k = self.v = None

    def ops(self) -> Ops:
        return replace(REFERENCE_OPS, rotary_write_kv=self.rotary_write_kv,
                                   paged_attention=self.paged_attention)

    def rotary_write_kv(self, q, k, v, positions, cos_sin, cache, meta, head_norm=None):
        q, self.k = apply_rotary_ref(*norm_heads_ref(q, k, head_norm), positions, cos_sin)
        self.v = v
        return q

    @staticmethod
    def fake_quantize(fake, x, rotated: bool):
        """x quantized and dequantized by `fake`, in the rotated basis if `rotated`."""
        if not rotated:
            return fake(x)
        r = rotation(x.shape[-1], torch.float32, x.device)
        return fake(x @ r) @ r.T

    def paged_attention(self, q, cache, meta, scale):
        w, length, d = self.windows, self.length, q.shape[-1]
        k, v = (x.float().view(w, length, -1, d) for x in (self.k, self.v))
        kq, vq = k, v
        if self.scheme is not None:
            s = self.scheme
            kq = k if s.k is None else self.fake_quantize(s.k, k, s.rotated)
            vq = v if s.v is None else self.fake_quantize(s.v, v, s.rotated)
            if s.sink_bits:  # the sink positions read through their own quantizer
                sink = slice(0, s.sink)
                kq, vq = kq.clone(), vq.clone()
                kq[:, sink] = self.fake_quantize(per_token(s.sink_bits), k[:, sink], s.rotated)
                vq[:, sink] = self.fake_quantize(per_token(s.sink_bits), v[:, sink], s.rotated)
            quantized = quantized_positions(s, length)
        else:
            quantized = torch.zeros(length, length, dtype=torch.bool)
        group = q.shape[1] // k.shape[2]
        heads = lambda x: x.transpose(1, 2).repeat_interleave(group, 1)  # noqa: E731  [W, H, L, d]
        qh = q.float().view(w, length, -1, d).transpose(1, 2)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = torch.where(quantized, qh @ heads(kq).transpose(-1, -2), qh @ heads(k).transpose(-1, -2))
        p = (scores * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        o = (p * quantized) @ heads(vq) + (p * ~quantized) @ heads(v)
        return o.transpose(1, 2).reshape(w * length, -1, d).to(q.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="independent windows, scored together")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window (a multiple of 64)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"from: {', '.join(SCHEMES)}")
    args = parser.parse_args()
    engine = LLM(device="cpu", enforce_eager=True, kv_cache_memory=16 << 20).core
    model = engine.runner.model
    attention = WhatIfAttention(args.windows, args.window)
    for layer in model.layers:
        layer.self_attn.ops = attention.ops()
    ids = torch.tensor(corpus_tokens(engine.tokenizer, args.windows * args.window))
    positions = torch.arange(args.window).repeat(args.windows)
    targets = ids.view(args.windows, args.window)[:, 1:, None]

    @torch.inference_mode()
    def logprobs(scheme: Scheme | None) -> torch.Tensor:
        attention.scheme = scheme
        hidden = model(ids, positions, [None] * len(model.layers), None)
        logits = model.compute_logits(hidden).view(args.windows, args.window, -1)[:, :-1]
        return F.log_softmax(logits, dim=-1)

    ref = logprobs(None)
    base_nll = -ref.gather(2, targets).mean().item()
    rows = {}
    print(f"{targets.numel()} tokens, {args.windows} windows of {args.window}; unquantized perplexity "
          f"{math.exp(base_nll):.4f}\n\n{'scheme':24} {'ppl':>8} {'vs auto':>8} {'KL (nats)':>10}")
    for name in args.schemes.split(","):
        start = time.perf_counter()
        logp = logprobs(SCHEMES[name])
        nll = -logp.gather(2, targets).mean().item()
        kl = F.kl_div(logp, ref, log_target=True, reduction="sum").item() / targets.numel()
        rows[name] = {"perplexity": math.exp(nll), "perplexity_increase_pct": 100 * (math.exp(nll - base_nll) - 1),
                      "mean_kl_nats": kl, "seconds": time.perf_counter() - start}
        print(f"{name:24} {rows[name]['perplexity']:8.4f} {rows[name]['perplexity_increase_pct']:+7.2f}% {kl:10.2e}",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "kv_quant_what_if_cpu.json"
    out.write_text(json.dumps({
        "model": engine.model_name, "device": "cpu", "host": platform.machine(), "dtype": "float32",
        "text": "pydoc_data.topics (sorted keys, joined)", "windows": args.windows, "window": args.window,
        "unquantized_perplexity": math.exp(base_nll), "schemes": rows,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
