"""Triton quantized GEMV for batch-1 decode: out = x @ dequantize(w).T for a row of x, on the
CUDA cores. Reference: kernels/quant_linear.py `quant_linear_ref` (weight-only here:
fp8 codes multiply x unquantized, as kernels/triton_quant_linear.py's decode path does).

At one row a tensor-core dot wastes 15 of its 16 rows, and feeding it costs more than the
product: every weight must be unpacked, scaled, rounded to bf16 and moved through shared
memory into the dot's operand layout, which left int4 decode at 0.16 of its bytes roofline.
Here each weight costs a few scalar instructions, counted because at 4 bits a weight the
instruction budget is about the bytes' budget (an H200 SM issues 128 lane-instructions a
clock; 4.2 TB/s over 132 SMs is ~16 bytes, i.e. 32 int4 weights, a clock):
  - a 4-bit code becomes a float without an int-to-float conversion (quarter rate): shifted
    into the top mantissa bits of 1.0 it is the float 1 + code / 16, exactly, and
    sum (1 + c/16) x = sum x + sum c x / 16 gives the code's product per word, so a code
    costs a shift, an and-or and its FMA (8 codes per loaded 32-bit word);
  - the scale is applied per group, not per weight: sum_k (c_k s + o) x_k =
    s * sum_k c_k x_k + o * sum_k x_k, so a weight costs one FMA and a group one more;
  - fp8 codes go through the hardware's packed e4m3 -> f16 conversion; a per-row scale
    multiplies the row's sum once, at the end.
Each program owns BLOCK_N output rows of one x row and streams them over all of K. No
split-K: one launch, no atomics. A second x row would read the weights again (from L2 at
best), so from two rows on the tensor-core kernel of kernels/triton_quant_linear.py, which
reads them once, is as fast or faster (benchmarks/results/quant_gemv_*.json).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, prefetch_rows_l2, wait_for_inputs
from wattserve.kernels.triton_gemv import PREFETCH_TILES
from wattserve.kernels.triton_u4_gemv_bf16x2 import bf16x2_fits, u4_gemv_bf16x2
from wattserve.kernels.weight_format import QuantizedWeight

MAX_ROWS = 1
# int4 (u4) weights times a bf16 x through kernels/triton_u4_gemv_bf16x2.py instead: its
# products are packed bf16 pairs (sm_90 main loop, int4 g128 at (8, 2048, 4): 3.2 instructions
# a weight against this kernel's 6.3, 80 registers against 121; at its own default tile
# (8, 2048, 2): 2.9), its error bounded by about 5.1 * 2^-8 sum |s (c - 8) x| (its module
# doc). Off: never yet run on a GPU. benchmarks/quant_gemv_bench.py times both variants of the
# int4 formats in one run (--sweep: over tile configs too), and tests/test_quant_gemv_bf16x2.py's
# GPU tests check its PTX against its interpreter twin bit for bit.
U4_BF16X2 = False


def default_config(w: QuantizedWeight) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for w, by kind and shape, from `benchmarks/
    quant_gemv_bench.py --sweep` on an H200 (results/quant_gemv_sweep_NVIDIA_H200.json,
    Llama-3.1-8B's matrices): long rows take long K tiles; a small matrix small tiles, for
    more programs and bytes in flight; a tall one (many rows) wide row tiles."""
    n, k = w.out_features, w.in_features
    if w.kind == "fp8":
        if k >= 8192:
            return (8, 2048, 8)
        return (4, 1024, 4) if n * k <= 32 << 20 else (32, 512, 8)
    if w.kind == "u4" and U4_BF16X2:  # chosen from its sm_90 SASS, not yet timed (its module doc)
        return (8, 2048, 2)
    if w.kind == "u4" and n >= 16384:
        return (16, 1024, 4)
    return (8, 2048, 4)


@triton.jit
def _one_plus_code(words, i: tl.constexpr):
    """4-bit code i of each 32-bit word as the float 1 + code / 16: the code moved to the top
    four mantissa bits under 1.0's exponent (a shift and one and-or, no conversion)."""
    if 4 * i >= 19:
        bits = words >> (4 * i - 19)
    else:
        bits = words << (19 - 4 * i)
    return ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _quant_gemv_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_xm, stride_cn, stride_sn, stride_om,
    PACKED: tl.constexpr, FP8: tl.constexpr, HAS_OFFSET: tl.constexpr, ROW_SCALE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
):
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # A tile is NG groups of GS loaded units (a unit: one 8-bit code, or a word of 8 4-bit
    # codes); a per-row scale makes the whole tile one "group" accumulated over every tile.
    PER_UNIT: tl.constexpr = 8 if PACKED else 1
    UNIT_BITS: tl.constexpr = c_ptr.dtype.element_ty.primitive_bitwidth
    # The codes are constant: their first tiles head for L2 while the previous kernel ends.
    prefetch_rows_l2(c_ptr + tl.minimum(rows, N - 1).to(tl.int64) * stride_cn, K // PER_UNIT,
                     PREFETCH_TILES * (BLOCK_K // PER_UNIT) * UNIT_BITS // 8, PDL)
    wait_for_inputs(PDL)
    NG: tl.constexpr = 1 if ROW_SCALE else BLOCK_K // GROUP
    GS: tl.constexpr = BLOCK_K // PER_UNIT // NG
    unit = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]  # [NG, GS] within the tile
    c_ptrs = c_ptr + rows[:, None, None].to(tl.int64) * stride_cn + unit[None, :, :]
    x_ptrs = x_ptr + m * stride_xm + unit * PER_UNIT
    # ROW_SCALE: sums of c * x and of x so far, each thread's 16-byte load summed in its
    # registers first and reduced across threads once, at the end ([BLOCK_N, NG, GS] float32
    # sums held 64 registers a thread, which left room for only 4 fp8 programs, 8 KB of loads
    # in flight each, on an SM). Group scales: a reduction per tile, group by group.
    VEC: tl.constexpr = min(128 // UNIT_BITS, GS)
    total = tl.zeros([BLOCK_N, NG, GS // VEC], dtype=tl.float32)
    x_total = tl.zeros([NG, GS // VEC], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # a mask constant along the row lets the load take 16 bytes at a time
            k_ok = unit < BLOCK_K
            codes = tl.load(c_ptrs, mask=row_ok[:, None, None], other=0)
        else:
            k_ok = k0 + unit * PER_UNIT < K
            codes = tl.load(c_ptrs, mask=row_ok[:, None, None] & k_ok[None, :, :], other=0)
        if PACKED:  # code i of a word is column 8 * word + i
            codes = codes.to(tl.uint32, bitcast=True)  # logical shifts: no sign to clear
            # x's 8 columns of each word in one vector load, then split apart in registers
            # (not 8 strided loads: a load per weight cost more than the weight's arithmetic).
            x8 = tl.load(x_ptrs[:, :, None] + tl.arange(0, 8)[None, None, :], mask=k_ok[:, :, None],
                         other=0.0).to(tl.float32)
            x_sum = tl.sum(x8, 2)
            even, odd = tl.split(tl.reshape(x8, [NG, GS, 2, 2, 2]))  # column bits (i4, i2, i1)
            x_0_4, x_2_6 = tl.split(even)
            x_1_5, x_3_7 = tl.split(odd)
            x0, x4 = tl.split(x_0_4)
            x2, x6 = tl.split(x_2_6)
            x1, x5 = tl.split(x_1_5)
            x3, x7 = tl.split(x_3_7)
            part = _one_plus_code(codes, 0) * x0[None, :, :]
            part += _one_plus_code(codes, 1) * x1[None, :, :]
            part += _one_plus_code(codes, 2) * x2[None, :, :]
            part += _one_plus_code(codes, 3) * x3[None, :, :]
            part += _one_plus_code(codes, 4) * x4[None, :, :]
            part += _one_plus_code(codes, 5) * x5[None, :, :]
            part += _one_plus_code(codes, 6) * x6[None, :, :]
            part += _one_plus_code(codes, 7) * x7[None, :, :]
            # sum (1 + c/16) x = sum x + sum c x / 16, both terms of x's size: no cancellation.
            part = (part - x_sum[None, :, :]) * 16.0
        else:
            if FP8:  # passed as bytes: a masked load's `other` cannot be an fp8 constant
                codes = codes.to(tl.float8e4nv, bitcast=True)
            x_sum = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            part = codes.to(tl.float32) * x_sum[None, :, :]
        if ROW_SCALE:
            total += tl.sum(tl.reshape(part, [BLOCK_N, NG, GS // VEC, VEC]), 3)
            x_total += tl.sum(tl.reshape(x_sum, [NG, GS // VEC, VEC]), 2)
        else:
            groups = k0 // GROUP + tl.arange(0, NG)
            s_off = rows[:, None] * stride_sn + groups[None, :]
            s_mask = row_ok[:, None] & (groups[None, :] < K // GROUP)
            scale = tl.load(s_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
            acc += tl.sum(tl.sum(part, 2) * scale, 1)
            if HAS_OFFSET:
                offset = tl.load(o_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
                acc += tl.sum(offset * tl.sum(x_sum, 1)[None, :], 1)
        c_ptrs += BLOCK_K // PER_UNIT
        x_ptrs += BLOCK_K
    if ROW_SCALE:
        acc = tl.sum(tl.sum(total, 2), 1) * tl.load(s_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            acc += tl.load(o_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(tl.float32) * tl.sum(tl.sum(x_total, 1), 0)
    tl.store(out_ptr + m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv_fits(x: torch.Tensor, w: QuantizedWeight, config: tuple[int, int, int] | None = None) -> bool:
    """Whether this kernel takes (x, w): few rows, and a tile that holds whole groups (or a
    per-row scale); 4-bit rows are read as 32-bit words, so K is a multiple of 8."""
    block_k = (config or default_config(w))[1]
    per_row = w.group == w.in_features
    return x.shape[0] <= MAX_ROWS and (per_row or block_k % w.group == 0) \
        and (w.kind != "u4" or (w.in_features % 8 == 0 and (per_row or w.group % 8 == 0)))


def quant_gemv_triton(x: torch.Tensor, w: QuantizedWeight,
                      config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x: [M <= MAX_ROWS, K] -> [M, N] in x's dtype. config: (BLOCK_N, BLOCK_K, warps), by kind."""
    assert gemv_fits(x, w, config), (x.shape, w)
    if w.perm is not None:
        x = x[:, w.perm]
    x = x.contiguous()
    config = config or default_config(w)
    if U4_BF16X2 and x.dtype == torch.bfloat16 and bf16x2_fits(w, config[1]):
        return u4_gemv_bf16x2(x, w, config)
    m, k = x.shape
    block_n, block_k, warps = config
    out = torch.empty(m, w.out_features, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    if w.kind == "u4":
        codes = w.codes.view(torch.int32)
    else:
        codes = w.codes.view(torch.uint8) if w.kind == "fp8" else w.codes
    offsets = w.offsets if w.offsets is not None else w.scales
    _quant_gemv_kernel[(m, triton.cdiv(w.out_features, block_n))](
        x, codes, w.scales, offsets, out, w.out_features, k,
        x.stride(0), codes.stride(0), w.scales.stride(0), out.stride(0),
        PACKED=w.kind == "u4", FP8=w.kind == "fp8", HAS_OFFSET=w.offsets is not None,
        ROW_SCALE=w.group == k, GROUP=w.group, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PDL=pdl_enabled(x.device), num_warps=warps, launch_pdl=pdl_enabled(x.device),
    )
    return out
