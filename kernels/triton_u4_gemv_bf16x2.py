"""int4 batch-1 GEMV whose products are packed bf16 pairs: out = x @ dequantize(w).T for a
bf16 row x and a "u4" weight (8 codes a 32-bit word, group scales, optional offsets).
Reference: kernels/quant_linear.py `quant_linear_ref`. A second variant of
kernels/triton_quant_gemv.py's u4 path, chosen there by `U4_BF16X2` (its comment says why
it is off).

That kernel spends ~6.3 sm_90 instructions a weight in its loop (a shift, an and-or and a
float32 FMA a code, plus x's unpacking), which keeps int4 decode instruction-bound at 0.34 of
its bytes roofline. Here one instruction works on two weights:
  - codes i and i+4 of a word sit 16 bits apart, so one shift and one and-or turn them into
    the bf16 pair (128 + c_i, 128 + c_{i+4}) with no conversion: bf16 128 is 0x4300, whose
    step is 1, so 128 + c carries c in its low mantissa bits, exactly;
  - a packed FMA subtracts 136 (exact: c - 8 in -8..7), a second multiplies x's matching pair
    (x_i, x_{i+4}) (two shuffles of x's bf16 words, shared by the tile's rows) and adds it
    to the word's running pair sum: the word's 8 products in 4 packed FMAs;
  - two neighbouring words' pair sums are added as a bf16 pair, its halves added to a float32
    sum, and that scaled once a group: sum_k (c_k s + o) x_k = s * sum_k (c_k - 8) x_k +
    (o + 8 s) * sum_k x_k, with sum x in float32 per group, shared by the rows.
Centering at 8 keeps products and sums small, so bf16's roundings are relative to them.

Layout: each thread holds VEC (4) neighbouring code words of one group in several rows, and
x's words are loaded in an order whose Triton layout is the code tile's own when all of a
program's rows fit in each thread's registers, i.e. BLOCK_K >= 1024 * warps (then x needs no
exchange through shared memory). sm_90 main loop, int4 g128 (g32), counted in the SASS
of triton.compile for GPUTarget("cuda", 90, 32), aligned arguments marked divisible by 16:
2.88 (3.03) instructions a weight at (8, 2048, 2 warps), 96 (80) registers; 3.23 (3.30) at
(8, 2048, 4), 80 (96) registers, where x goes through shared memory;
the float32 kernel: 6.27 (6.63), 121 (94) registers.

Error bound (tests/test_quant_gemv_bf16x2.py checks it against float64, bf16 x exact):
bf16 has unit roundoff u = 2^-8, and each packed FMA or add rounds once: a word's half sums 4
products through 4 FMAs, and one more add joins it to its neighbour word's, so a product
passes at most 5 roundings and |joined sum - exact| <= ((1 + u)^5 - 1) sum |p| <= 5.1 u
sum |p| over its products p = (c - 8) x. Everything after is float32 (unit 2^-24), at most
K/8 + 64 roundings deep at the tiles served (BLOCK_K <= 2048). Hence, before out's own
rounding to its dtype,
  |out - exact| <= (5.1 + 1.02 (K/8 + 64) 2^-16) u sum_k |s (c_k - 8) x_k|
                   + (K + 64) 2^-24 sum_k |(o + 8 s) x_k|      (tests/test_quant_gemv_bf16x2.py `bound`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, prefetch_rows_l2, wait_for_inputs
from wattserve.kernels.triton_bf16x2 import ONE_X2, and_or, fma_bf16x2, halves_f32
from wattserve.kernels.triton_gemv import PREFETCH_TILES
from wattserve.kernels.triton_interpreter import interpreting
from wattserve.kernels.weight_format import QuantizedWeight

CENTER = tl.constexpr(8)  # codes 0..15 become c - 8 before the product
MINUS_136_X2 = tl.constexpr(0xC308C308 - (1 << 32))  # bf16 -136 (0xC308) in both halves, as int32


@triton.jit
def _code_pair(words, i: tl.constexpr, EMULATE: tl.constexpr):
    """Codes i and i+4 of each word as the bf16 pair (128 + c_i, 128 + c_{i+4}): code i+4 is
    16 bits above code i, so one shift puts both at their half's bottom."""
    return and_or(words >> (4 * i), 0x000F000F, 0x43004300, EMULATE)


@triton.jit
def _centered_products(words, x_pair, i: tl.constexpr, acc, FIRST: tl.constexpr, EMULATE: tl.constexpr):
    """acc + ((c_i - 8) x_i, (c_{i+4} - 8) x_{i+4}) as bf16 pairs; (128 + c) - 136 is exact."""
    centered = fma_bf16x2(_code_pair(words, i, EMULATE), ONE_X2, MINUS_136_X2, EMULATE)
    return fma_bf16x2(centered, x_pair, 0 if FIRST else acc, EMULATE)


@triton.jit
def _as_tile(t, NG: tl.constexpr, GS: tl.constexpr):
    """[GS / VEC, NG, VEC] (x's load order) -> [NG, GS] (the code tile's)."""
    return tl.reshape(tl.permute(t, 1, 0, 2), [NG, GS])


@triton.jit
def _u4_gemv_bf16x2_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_xm, stride_cn, stride_sn, stride_om,
    HAS_OFFSET: tl.constexpr, ROW_SCALE: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr,
):
    # x_ptr: x's bf16 as int32 words (x_2j, x_2j+1); c_ptr: int32 words of 8 codes, code i of
    # word j is column 8 j + i; stride_xm counts words.
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # Rows past N read row N - 1 (never stored): no row mask, so no zeroing and no predicate
    # on the loads of codes and scales.
    rows_read = tl.minimum(rows, N - 1)
    prefetch_rows_l2(c_ptr + rows_read.to(tl.int64) * stride_cn, K // 8, PREFETCH_TILES * BLOCK_K // 2, PDL)
    wait_for_inputs(PDL)
    # A tile: NG groups of GS code words of BLOCK_N rows, as [NG, BLOCK_N, GS]: rows ahead of
    # groups would spread the rows over a warp's lanes (Triton's layout gives threads to the
    # dimensions in that order after the contiguous one), and every lane would unpack x for
    # its own words; this way a thread holds several rows of the same words. A per-row scale
    # makes the whole tile one group, summed over every tile.
    NG: tl.constexpr = 1 if ROW_SCALE else BLOCK_K // GROUP
    GS: tl.constexpr = BLOCK_K // 8 // NG
    unit = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]
    c_ptrs = c_ptr + rows_read[None, :, None].to(tl.int64) * stride_cn + unit[:, None, :]
    VEC: tl.constexpr = min(4, GS)  # a thread's 16-byte load of code words
    # x's 4 words (8 bf16) of each code word, as [GS / VEC, NG, VEC, 4]: Triton lays a load out
    # from its contiguous dimension on (x's 4 words), then the others in index order, so this
    # order gives lanes to GS / VEC, then NG, then warps to NG and leaves VEC in registers: the
    # code tile's layout (module doc), permuted back to [NG, GS] by `_as_tile` at no cost.
    x_unit = tl.arange(0, GS // VEC)[:, None, None] * VEC + tl.arange(0, NG)[None, :, None] * GS \
        + tl.arange(0, VEC)[None, None, :]
    x_ptrs = x_ptr + m * stride_xm + x_unit[:, :, :, None] * 4 + tl.arange(0, 4)[None, None, None, :]
    # Sums of each thread's own terms, reduced across threads once, after the loop:
    # s * sum (c - 8) x, and (o + 8 s) * sum x.
    total = tl.zeros([NG, BLOCK_N, GS // VEC], dtype=tl.float32)
    shifted = tl.zeros([NG, BLOCK_N], dtype=tl.float32)
    x_total = tl.zeros([NG, GS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            words = tl.load(c_ptrs)
            x_words = tl.load(x_ptrs)
        else:  # code 0 past K: (0 - 8) * x, with x 0 there
            words = tl.load(c_ptrs, mask=(k0 + unit * 8 < K)[:, None, :], other=0)
            x_words = tl.load(x_ptrs, mask=(k0 + x_unit * 8 < K)[:, :, :, None], other=0)
        x_low, x_high = halves_f32(x_words)  # (x0,x1) (x2,x3) (x4,x5) (x6,x7)
        x_sum = _as_tile(tl.sum(x_low + x_high, 3), NG, GS)
        x01_45, x23_67 = tl.split(tl.reshape(x_words, [GS // VEC, NG, VEC, 2, 2]))
        x01, x45 = tl.split(x01_45)
        x23, x67 = tl.split(x23_67)
        x04 = _as_tile((x01 & 0xFFFF) | (x45 << 16), NG, GS)[:, None, :]
        x15 = _as_tile(((x01 >> 16) & 0xFFFF) | (x45 & -65536), NG, GS)[:, None, :]
        x26 = _as_tile((x23 & 0xFFFF) | (x67 << 16), NG, GS)[:, None, :]
        x37 = _as_tile(((x23 >> 16) & 0xFFFF) | (x67 & -65536), NG, GS)[:, None, :]
        pair_sum = _centered_products(words, x04, 0, 0, True, EMULATE)
        pair_sum = _centered_products(words, x15, 1, pair_sum, False, EMULATE)
        pair_sum = _centered_products(words, x26, 2, pair_sum, False, EMULATE)
        pair_sum = _centered_products(words, x37, 3, pair_sum, False, EMULATE)
        # Two neighbouring words' pair sums added as bf16 (one more rounding), then the halves
        # as float32: 2.5 instructions a word where each word's own float32 sum took 4.
        first, second = tl.split(tl.reshape(pair_sum, [NG, BLOCK_N, GS // 2, 2]))
        low, high = halves_f32(fma_bf16x2(first, ONE_X2, second, EMULATE))
        part = tl.sum(tl.reshape(low + high, [NG, BLOCK_N, GS // VEC, VEC // 2]), 3)
        if ROW_SCALE:
            total += part
            x_total += x_sum
        else:
            groups = k0 // GROUP + tl.arange(0, NG)
            s_off = rows_read[None, :] * stride_sn + groups[:, None]
            if EVEN_K:
                scale = tl.load(s_ptr + s_off).to(tl.float32)
                offset = tl.load(o_ptr + s_off).to(tl.float32) if HAS_OFFSET else 0.0
            else:
                s_mask = groups[:, None] < K // GROUP
                scale = tl.load(s_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
                offset = tl.load(o_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32) if HAS_OFFSET else 0.0
            total += part * scale[:, :, None]
            shifted += (CENTER * scale + offset) * tl.sum(x_sum, 1)[:, None]  # the centering's share and o's
        c_ptrs += BLOCK_K // 8
        x_ptrs += BLOCK_K // 2
    acc = tl.sum(tl.sum(total, 2), 0) + tl.sum(shifted, 0)
    if ROW_SCALE:
        scale = tl.load(s_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
        shift = CENTER * scale
        if HAS_OFFSET:
            shift += tl.load(o_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * scale + shift * tl.sum(tl.sum(x_total, 1), 0)
    tl.store(out_ptr + m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def bf16x2_fits(w: QuantizedWeight, block_k: int) -> bool:
    """Whether this kernel takes w at a K tile of block_k (on top of triton_quant_gemv's
    gemv_fits): neighbouring code words are added in pairs, so a group (or a tile, per-row
    scales) holds an even number of words."""
    return w.kind == "u4" and (w.group % 16 == 0 if w.group < w.in_features else block_k % 16 == 0)


def u4_gemv_bf16x2(x: torch.Tensor, w: QuantizedWeight, config: tuple[int, int, int],
                   emulate: bool | None = None) -> torch.Tensor:
    """x: [M, K] (already in w's column order, contiguous) -> [M, N] in x's dtype; x is
    multiplied as bf16. config: (BLOCK_N, BLOCK_K, warps). emulate: the bf16x2 math in plain
    Triton instead of PTX (default: under the interpreter only; a GPU test compares both)."""
    m, k = x.shape
    block_n, block_k, warps = config
    out = torch.empty(m, w.out_features, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    x_words = x.to(torch.bfloat16).view(torch.int32)
    codes = w.codes.view(torch.int32)
    offsets = w.offsets if w.offsets is not None else w.scales
    pdl = pdl_enabled(x.device)
    _u4_gemv_bf16x2_kernel[(m, triton.cdiv(w.out_features, block_n))](
        x_words, codes, w.scales, offsets, out, w.out_features, k,
        x_words.stride(0), codes.stride(0), w.scales.stride(0), out.stride(0),
        HAS_OFFSET=w.offsets is not None, ROW_SCALE=w.group == k, GROUP=w.group, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, PDL=pdl,
        EMULATE=interpreting() if emulate is None else emulate, num_warps=warps,
        launch_pdl=pdl,
    )
    return out
