"""Linear weights kept in a compact format: what each format stores and how it dequantizes.

Every format is codes times a scale, plus an offset, per group of `group` input columns of
one output row, so one reference and one Triton kernel (kernels/triton_quant_linear.py) read
them all:

- "u4": codes 0..15, two per byte (byte j of a row: column 2j in the low nibble, 2j+1 in the
  high one), value = code * scale + offset. GGUF Q4_0 (offset -8 * scale), Q4_1 (offset the
  block minimum), AWQ and GPTQ (offset -zero * scale) and int4 RTN at load.
- "i8": int8 codes, value = code * scale. GGUF Q8_0.
- "fp8": float8_e4m3fn codes, value = code * scale, one scale per output row (group = K).
  The matmul quantizes the activations per token too (W8A8).

Loaders repack a checkpoint's blocks into these planes once (codes, scales, offsets as
separate tensors, so a kernel loads each aligned); the bytes per weight stay the file's,
except AWQ/GPTQ offsets, held in float32 so that -zero * scale is exact.
"""
from __future__ import annotations

import torch
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# fp8 weights at load: e4m3's rounding error is relative (3 mantissa bits) whatever the scale,
# but which values of a row land near a grid point, and which midway, depends on it. Of the
# scales that put the row's largest magnitude on one of these tops (e4m3's top binade, 256..448
# in steps of 32), the one with the least squared error wins: a load-time cost only. Default
# model, 20,480 tokens (benchmarks/results/weight_quant_cpu.json): fp8 W8A8's perplexity
# change +3.25% with 448 alone, +0.92% so; KL from the dense model's 2.80e-2 -> 2.26e-2, the
# weights' rounding alone 1.74e-2 -> 1.21e-2. Over 4,096 tokens 13 or 25 tops did no better.
FP8_WEIGHT_TOPS = tuple(FP8_MAX - 32.0 * i for i in range(7))


class QuantizedWeight(nn.Module):
    """A linear layer's weight of logical shape [out_features N, in_features K].

    Buffers: codes [N, K/2] uint8 (u4) or [N, K] int8 / float8_e4m3fn; scales [N, K/group];
    offsets [N, K/group] or None; perm [K] long or None: GPTQ act-order stores the columns in
    perm's order, so the layer computes x[:, perm] @ stored.T. `source` names the checkpoint
    format for the load log ("gguf Q4_1", "awq int4 g128").
    """

    def __init__(self, kind: str, codes: torch.Tensor, scales: torch.Tensor, group: int,
                 offsets: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 source: str = ""):
        super().__init__()
        assert kind in ("u4", "i8", "fp8")
        self.kind, self.group, self.source = kind, group, source or kind
        self.out_features = codes.shape[0]
        self.in_features = codes.shape[1] * (2 if kind == "u4" else 1)
        assert self.in_features % group == 0 and scales.shape == (self.out_features, self.in_features // group)
        assert offsets is None or offsets.shape == scales.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("perm", perm)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"{self.source}, shape={tuple(self.shape)}, group={self.group}"

    def same_layout(self, other: QuantizedWeight) -> bool:
        """Whether the two can be stacked into one weight (same kind, group, column order)."""
        same_perm = (self.perm is None and other.perm is None) or (
            self.perm is not None and other.perm is not None and torch.equal(self.perm, other.perm))
        return (self.kind, self.group, self.in_features, self.offsets is None, self.scales.dtype) == \
            (other.kind, other.group, other.in_features, other.offsets is None, other.scales.dtype) and same_perm

    def map_rows(self, fn) -> QuantizedWeight:
        """A copy with `fn` (a function of a [N, ...] tensor that reorders or picks rows)
        applied to every per-row plane."""
        offsets = None if self.offsets is None else fn(self.offsets)
        return QuantizedWeight(self.kind, fn(self.codes), fn(self.scales), self.group, offsets, self.perm,
                               self.source)


class QuantizedParts(nn.ModuleList):
    """Stacked linears (q/k/v, gate/up) whose parts cannot share one layout (GGUF Q4_K_M mixes
    formats per tensor; GPTQ act-order gives each its own column order): each part runs alone
    and the outputs are concatenated."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.out_features for p in self), self[0].in_features))


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight | QuantizedParts:
    """Parts of one stacked weight, in output-row order, as one weight where their layouts agree."""
    if len(parts) == 1:
        return parts[0]
    if not all(parts[0].same_layout(p) for p in parts[1:]):
        return QuantizedParts(parts)
    first = parts[0]
    offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts])
    return QuantizedWeight(first.kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           first.group, offsets, first.perm, first.source)


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] in the original column order, computed in float32."""
    if w.kind == "u4":
        codes = torch.stack([w.codes & 15, w.codes >> 4], dim=-1).reshape(w.out_features, w.in_features)
    else:
        codes = w.codes
    grouped = codes.float().reshape(w.out_features, -1, w.group)
    dense = grouped * w.scales.float()[..., None]
    if w.offsets is not None:
        dense = dense + w.offsets.float()[..., None]
    dense = dense.reshape(w.out_features, w.in_features)
    if w.perm is not None:
        dense = torch.empty_like(dense).index_copy_(1, w.perm, dense)
    return dense.to(dtype)


def pack_u4(codes: torch.Tensor) -> torch.Tensor:
    """codes: [N, K] integers 0..15 -> [N, K/2] uint8, column 2j low nibble, 2j+1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor, group: int = 128) -> QuantizedWeight:
    """Round-to-nearest asymmetric int4 per group of `group` columns (the zero point an
    integer, as AWQ and GPTQ store it). w: [N, K] with K % group == 0."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-8).half()
    s = scales.float()
    zeros = (-lo / s).round().clamp(0, 15)
    codes = (g / s[..., None] + zeros[..., None]).round().clamp(0, 15).reshape(n, k)
    return QuantizedWeight("u4", pack_u4(codes), scales, group, -zeros * s, source=f"int4 RTN g{group}")


def quantize_fp8(w: torch.Tensor) -> QuantizedWeight:
    """float8_e4m3fn with one float32 scale per output row, chosen among FP8_WEIGHT_TOPS' for
    the least squared error (ties: the larger top). w: [N, K]."""
    w = w.float()
    amax = w.abs().amax(-1, keepdim=True)
    codes = scales = best_err = None
    for top in FP8_WEIGHT_TOPS:
        s = (amax / top).clamp(min=1e-12)
        c = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        err = (c.float() * s - w).square().sum(-1, keepdim=True)
        if codes is None:
            codes, scales, best_err = c, s, err
            continue
        better = err < best_err
        codes = torch.where(better, c.view(torch.uint8), codes.view(torch.uint8)).view(torch.float8_e4m3fn)
        scales, best_err = torch.where(better, s, scales), torch.minimum(err, best_err)
    return QuantizedWeight("fp8", codes, scales, w.shape[1], source="fp8 per-channel")


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]), x ~= codes * scales."""
    scales = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers: what the weights take in memory."""
    return sum(t.numel() * t.element_size() for t in module.parameters()) + sum(
        t.numel() * t.element_size() for name, t in module.named_buffers() if "cos_sin" not in name)
