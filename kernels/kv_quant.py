"""Quantize and dequantize KV values: the reference encodings of every --kv-cache-dtype.

These functions define the formats; the Triton write and attention kernels must agree with
them bit for bit on the codes (tests/test_kv_quant*.py check it).

- Per-token integer (int8, and int4's and int2's V): for each token and kv head, an asymmetric
  range over the head's channels, widened to include 0 so that the zero point is an integer
  (uint8) code: x ~= (q - z) * s. Metadata: scale fp16 + zero uint8, 3 bytes per token-head.
- Per-channel integer (int4's and int2's K, KIVI): for each block, kv head and channel, the range over
  the block's tokens: x ~= q * s + m with fp16 scale s and fp16 minimum m. Keys have outlier
  channels whose values share a sign, so here the range is not widened to include 0.
- fp8 e4m3: x ~= code * s, one fp16 s per token and kv head: absmax / top, for the `top` of
  FP8_TOPS that gives the least squared error.

Codes narrower than a byte are packed along the channel axis, lowest bits first: channel c
lives in byte c // (8 // bits) at bit (c % (8 // bits)) * bits.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# e4m3's top binade holds 256..448 in steps of 32. Scaling a token's largest magnitude onto
# one of several tops moves where its other values fall on the coarse grid (3 mantissa bits);
# the least squared error wins. With K and V rotated (kv_rotation.py), on the default model
# (benchmarks/kv_quant_what_if.py, KL from the unquantized cache over 4 windows of 1,024;
# benchmarks/results/kv_quant_what_if_cpu.json): 448 alone (`fp8_e4m3_absmax_scale`) 4.83e-3,
# these three 3.80e-3; with FP8_TOPS set otherwise, all seven of the binade 3.67e-3,
# 448/384/320 3.87e-3, 448/320 4.00e-3. Three keep 89% of the seven's gain, and the GPU
# write's search costs per top (kernels/triton_kv_write.py).
FP8_TOP_STEP = 96.0
FP8_TOPS = tuple(FP8_MAX - FP8_TOP_STEP * i for i in range(3))  # 448, 352, 256


def stored_scale(s: torch.Tensor) -> torch.Tensor:
    """The fp16 scale actually stored, as float32; a zero range gets scale 1 (codes all 0)."""
    s16 = s.to(torch.float16).float()
    return torch.where(s16 > 0, s16, torch.ones_like(s16))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] (values < 2**bits) -> [..., d * bits // 8] bytes."""
    if bits == 8:
        return q
    per = 8 // bits
    q = q.view(*q.shape[:-1], q.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: bytes [..., n] -> codes [..., n * 8 // bits] (int32)."""
    if bits == 8:
        return b.to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(per, device=b.device, dtype=torch.int32) * bits
    q = (b.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return q.flatten(-2)


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., d] -> (packed codes uint8 [..., d*bits//8], scale fp16 [...], zero uint8 [...])."""
    qmax = (1 << bits) - 1
    x = x.float()
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1).clamp(min=0.0)
    s = stored_scale((hi - lo) / qmax)
    z = torch.round(-lo / s).clamp(0, qmax)
    q = (torch.round(x / s[..., None]) + z[..., None]).clamp(0, qmax)
    return pack(q.to(torch.uint8), bits), s.to(torch.float16), z.to(torch.uint8)


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `quantize_per_token`, float32 [..., d]."""
    return (unpack(codes, bits).float() - zero.float()[..., None]) * scale.float()[..., None]


def quantize_per_channel(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [tokens, heads, d], one block -> (packed codes [tokens, heads, d*bits//8], scale fp16
    [heads, d], min fp16 [heads, d]): one range per channel over the block's tokens."""
    qmax = (1 << bits) - 1
    x = x.float()
    m = x.amin(0).to(torch.float16).float()
    s = stored_scale((x.amax(0) - m) / qmax)
    q = torch.round((x - m) / s).clamp(0, qmax)
    return pack(q.to(torch.uint8), bits), s.to(torch.float16), m.to(torch.float16)


def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., tokens, heads, n], scale/min [..., heads, d] -> float32 [..., tokens, heads, d]."""
    return unpack(codes, bits).float() * scale.float().unsqueeze(-3) + minimum.float().unsqueeze(-3)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (float8_e4m3fn codes [..., d], scale fp16 [...]). Errors are summed in
    float64, so that the Triton kernel, summing in another order, picks the same scale."""
    x = x.float()
    amax = x.abs().amax(-1)
    best = None
    for top in FP8_TOPS:
        s = stored_scale(amax / top)
        codes = (x / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        err = (codes.float() * s[..., None] - x).double().square().sum(-1)
        if best is None:
            best = [codes.view(torch.uint8), s, err]
            continue
        better = err < best[2]  # ties keep the earlier top
        best = [torch.where(better[..., None], codes.view(torch.uint8), best[0]), torch.where(better, s, best[1]),
                torch.minimum(err, best[2])]
    return best[0].view(torch.float8_e4m3fn), best[1].to(torch.float16)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[..., None]
