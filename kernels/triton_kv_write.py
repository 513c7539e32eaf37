"""Triton KV write: the new tokens' K and V into their cache slots, quantized on the way.
Reference: kv_write.write_kv_ref (the encodings: kernels/kv_quant.py).

- auto: one program per token stores its [num_kv_heads, head_dim] rows of K and V.
- fp8_e4m3, int8 (per-token formats): the same program also takes each head's range over
  head_dim and stores codes, fp16 scale (and uint8 zero) beside them. Channels are loaded as
  [heads, bytes, codes per byte], so packing sub-byte codes is a shift and a sum over the
  last axis.
- int4, int2 (KIVI): a block is quantized only when it fills up, one program per (flushed
  block, kv head), from the ring (its earlier tokens) and this step's K/V (the rest);
  int2 also stores the block's first token at int8 (its sink copy). Then the tokens from
  each sequence's ring start on go to its ring with the unquantized kernel.
  Flush first: the ring rows it reads may be overwritten by the same step's ring writes.

Codes match the reference bit for bit: division is IEEE (div_rn, not the approximate '/'),
rounding half to even as torch.round, and the fp16-rounded scale is the one encoded with.
fp8 codes come from the GPU's conversion where compiled for sm_89+, and under the interpreter
(which rounds Triton's cast differently from torch) from the float's bits (round to nearest
even, subnormals included); fp8's scale search is screened in float32 (`_quantize_fp8_rows`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.kv_quant import FP8_MAX, FP8_TOP_STEP, FP8_TOPS
from wattserve.kernels.triton_interpreter import interpreting

# 1.5 * 2**23: adding then subtracting it rounds a float32 of magnitude < 2**22 to an integer,
# half to even (the hardware's rounding of the add), as torch.round does.
_ROUND_MAGIC = tl.constexpr(12582912.0)
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_NUM_TOPS = tl.constexpr(len(FP8_TOPS))
_FP8_TOP_STEP = tl.constexpr(FP8_TOP_STEP)
# fp8 scale search: screened errors within this relative distance of the best are a near tie,
# decided exactly (`_quantize_fp8_rows`); the screening's own error is under 1e-5 relative.
FP8_NEAR_TIE = 1e-4
# The screening's rounding to e4m3: float arithmetic on the CUDA cores (`_fp8_values_by_adds`)
# instead of the conversion instructions (two per value and top, whose rate on sm_90 the
# tables leave open). Off: as measured on the H200 with seven tops, 3.25x bf16's write
# (benchmarks/results/long_context_NVIDIA_H200.json); kv_quant_kernel_bench.py --fp8-screen-adds
# times it on. With three (kv_quant.FP8_TOPS) the write's common path is 1,080 sm_90
# instructions against seven's 1,760; not yet timed.
FP8_SCREEN_BY_ADDS = False


def native_fp8(device: torch.device) -> bool:
    """Whether the kernels convert to fp8 with the GPU's instruction (sm_89+, compiled): the
    interpreter rounds Triton's cast differently from torch."""
    return (not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 9))


@triton.jit
def _round_half_even(x):
    return (x + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _to_cache(x, cache_ptr):
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_tok, stride_c_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    # The three loads are independent, so all are in flight at once.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    k = tl.load(k_ptr + tok * stride_k_tok + h * stride_k_head + d, mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + h * stride_v_head + d, mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_tok + h * stride_c_head + d
    store = mask & (slot >= 0)  # slot < 0: a padding token (CUDA-graph batch), slot untouched
    tl.store(k_cache_ptr + dst, _to_cache(k, k_cache_ptr), mask=store)
    tl.store(v_cache_ptr + dst, _to_cache(v, v_cache_ptr), mask=store)


# ---- encodings (kv_quant's, on float32 tiles) -------------------------------------------------
@triton.jit
def _fp16_scale(s):
    """The fp16 scale stored, as float32; a zero range gets scale 1 (kv_quant.stored_scale)."""
    s = s.to(tl.float16).to(tl.float32)
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _fp8_e4m3(y):
    """float32 y, |y| <= 448 -> (float8_e4m3fn bit pattern (uint8), its value as float32),
    rounded to nearest even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(y)
    ab = a.to(tl.int32, bitcast=True)
    # Normal: round the 23-bit mantissa to 3 bits (a carry moves into the exponent, as it
    # should); r << 20 is the rounded float32, and rebiasing the exponent from 127 to 7 gives
    # the code.
    r = (ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20
    normal = r - ((127 - 7) << 3)
    # Subnormal (below 2**-6): multiples of 2**-9; code 8 is 2**-6, the smallest normal.
    sub = _round_half_even(a * 512.0)
    is_sub = a < 0.015625
    magnitude = tl.where(is_sub, sub * (1.0 / 512.0), (r << 20).to(tl.float32, bitcast=True))
    code = (tl.where(is_sub, sub.to(tl.int32), normal) | sign).to(tl.uint8)
    return code, tl.where(sign != 0, -magnitude, magnitude)


@triton.jit
def fp8_codes(y, NATIVE: tl.constexpr):
    """float32 y -> (float8_e4m3fn bit patterns (uint8), their values as float32): clamped to
    +-448 (a scale rounded into fp16's subnormals can put |y| past it), rounded to nearest
    even. NATIVE: the GPU's conversion, which saturates (cvt.rn.satfinite.e4m3x2.f32, sm_89+,
    seen in Triton 3.6's PTX), else `_fp8_e4m3`'s bit arithmetic."""
    if NATIVE:
        f8 = y.to(tl.float8e4nv)
        return f8.to(tl.uint8, bitcast=True), f8.to(tl.float32)
    else:
        return _fp8_e4m3(tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX))


@triton.jit
def _fp8_values_by_adds(y):
    """float32 y -> the e4m3 value it rounds to (nearest even, clamped to +-448), as float32,
    by float adds: y + C - C with C = 1.5 * 2**(e + 20) rounds y to a multiple of 2**(e - 3),
    e4m3's spacing in y's binade e (subnormals: 2**-9, so e at least -6)."""
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    exponent = tl.maximum(y.to(tl.int32, bitcast=True) & 0x7F800000, (127 - 6) << 23)
    c = (exponent + ((20 << 23) | 0x400000)).to(tl.float32, bitcast=True)
    return (y + c) - c


@triton.jit
def _fp8_scale(amax, i):
    """The scale that puts `amax` [R] on the i-th of FP8_TOPS, as stored (fp16)."""
    return _fp16_scale(tl.math.div_rn(amax, _FP8_MAX - _FP8_TOP_STEP * i))


@triton.jit
def _fp8_best_scale_exact(x, amax, NATIVE: tl.constexpr):
    """kv_quant.quantize_fp8's choice for x [R, D]: each top's codes by IEEE division, their
    squared error summed in float64; ties keep the earlier top. Scales [R]."""
    best_err = tl.full(amax.shape, float("inf"), tl.float64)
    best_s = tl.zeros_like(amax)
    for i in tl.static_range(_FP8_NUM_TOPS):
        s = _fp8_scale(amax, i)
        _, values = fp8_codes(tl.math.div_rn(x, s[:, None]), NATIVE)
        diff = (values * s[:, None] - x).to(tl.float64)
        err = tl.sum(diff * diff, axis=1)
        better = err < best_err
        best_s = tl.where(better, s, best_s)
        best_err = tl.where(better, err, best_err)
    return best_s


@triton.jit
def _quantize_fp8_rows(x, NATIVE: tl.constexpr, NEAR_TIE: tl.constexpr, BY_ADDS: tl.constexpr):
    """x [R, D] float32 -> (codes [R, D] uint8, scale fp32 [R]): kv_quant.quantize_fp8.

    The tops are screened in float32, each top's codes made by multiplying with its scale's
    reciprocal (the GPU's approximate one) instead of dividing by the scale (seven IEEE
    divisions and float64 sums per value made the write 14.5x bf16's on an H200, issue 23).
    Screened and exact errors differ by a few float32 roundings per term (a quotient a few
    ulps off moves a code only at a rounding midpoint, where both codes err alike), far under
    NEAR_TIE relative; so where
    no other scale's screened error comes within NEAR_TIE of the best, the best is the exact
    search's too. A tile with any such near tie is searched exactly (`_fp8_best_scale_exact`).
    The codes of the chosen scale come from one IEEE division, as the reference's."""
    amax = tl.max(tl.abs(x), axis=1)
    errs = ()
    scales = ()
    for i in tl.static_range(_FP8_NUM_TOPS):
        s = _fp8_scale(amax, i)
        if BY_ADDS:
            values = _fp8_values_by_adds(x * (1.0 / s)[:, None])
        else:
            _, values = fp8_codes(x * (1.0 / s)[:, None], NATIVE)
        diff = values * s[:, None] - x
        errs = errs + (tl.sum(diff * diff, axis=1),)
        scales = scales + (s,)
    best_err = errs[0]
    best_s = scales[0]
    for i in tl.static_range(1, _FP8_NUM_TOPS):
        better = errs[i] < best_err  # ties keep the earlier top
        best_s = tl.where(better, scales[i], best_s)
        best_err = tl.where(better, errs[i], best_err)
    near = tl.zeros(amax.shape, tl.int32)
    for i in tl.static_range(_FP8_NUM_TOPS):  # equal scales give equal errors: no tie to resolve
        near = near | ((scales[i] != best_s) & (errs[i] <= best_err * (1.0 + NEAR_TIE))).to(tl.int32)
    if tl.max(near, axis=0) > 0:
        best_s = _fp8_best_scale_exact(x, amax, NATIVE)
    codes, _ = fp8_codes(tl.math.div_rn(x, best_s[:, None]), NATIVE)
    return codes, best_s


@triton.jit
def _pack(q, BITS: tl.constexpr):
    """codes [R, NB, PER] (float32 integers < 2**BITS) -> bytes [R, NB]: code j of a byte at
    bit j * BITS."""
    shift = tl.arange(0, 8 // BITS)[None, None, :] * BITS
    return tl.sum(q.to(tl.int32) << shift, axis=2).to(tl.uint8)


@triton.jit
def _quantize_rows(x, BITS: tl.constexpr):
    """x [R, NB, PER] float32 (a row's channels; padding 0) -> (bytes [R, NB], scale fp16 [R],
    zero uint8 [R]): per row, kv_quant.quantize_per_token."""
    qmax: tl.constexpr = (1 << BITS) - 1
    lo = tl.minimum(tl.min(tl.min(x, axis=2), axis=1), 0.0)
    hi = tl.maximum(tl.max(tl.max(x, axis=2), axis=1), 0.0)
    s = _fp16_scale(tl.math.div_rn(hi - lo, qmax * 1.0))
    z = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-lo, s)), 0.0), qmax)
    q = _round_half_even(tl.math.div_rn(x, s[:, None, None])) + z[:, None, None]
    q = tl.minimum(tl.maximum(q, 0.0), qmax)
    return _pack(q, BITS), s.to(tl.float16), z.to(tl.uint8)


@triton.jit
def _quantize_columns(x, BITS: tl.constexpr):
    """x [T, NB, PER] float32, one block's tokens -> (bytes [T, NB], scale fp16 [NB, PER],
    min fp16 [NB, PER]): per channel over the tokens, kv_quant.quantize_per_channel."""
    qmax: tl.constexpr = (1 << BITS) - 1
    m = tl.min(x, axis=0).to(tl.float16).to(tl.float32)
    s = _fp16_scale(tl.math.div_rn(tl.max(x, axis=0) - m, qmax * 1.0))
    q = _round_half_even(tl.math.div_rn(x - m[None, :, :], s[None, :, :]))
    q = tl.minimum(tl.maximum(q, 0.0), qmax)
    return _pack(q, BITS), s.to(tl.float16), m.to(tl.float16)


# ---- per-token formats: fp8_e4m3, int8 ---------------------------------------------------------
@triton.jit
def _write_kv_quant_kernel(
    k_ptr, v_ptr, k_codes_ptr, v_codes_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, slot_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_tok, stride_c_head, stride_m_block, stride_m_tok,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    BLOCK_BYTES: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr,
    NATIVE_FP8: tl.constexpr, FP8_NEAR_TIE: tl.constexpr, FP8_BY_ADDS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    PER: tl.constexpr = 1 if FP8 else 8 // BITS
    h = tl.arange(0, BLOCK_HEADS)
    byte = tl.arange(0, BLOCK_BYTES)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    keep = slot >= 0
    codes_dst = block * stride_c_block + offset * stride_c_tok + h[:, None] * stride_c_head + byte[None, :]
    codes_mask = keep & (h[:, None] < NUM_KV_HEADS) & (byte[None, :] < HEAD_DIM // PER)
    meta_dst = block * stride_m_block + offset * stride_m_tok + h
    meta_mask = keep & (h < NUM_KV_HEADS)
    # Padding channels read 0: inside every range (per-token ranges include 0, fp8's absmax).
    if FP8:  # [heads, channels]: a row's 16-byte loads and its sums stay inside one warp
        mask = (h[:, None] < NUM_KV_HEADS) & (byte[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + tok * stride_k_tok + h[:, None] * stride_k_head + byte[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + tok * stride_v_tok + h[:, None] * stride_v_head + byte[None, :], mask=mask, other=0.0)
        kq, ks = _quantize_fp8_rows(k.to(tl.float32), NATIVE_FP8, FP8_NEAR_TIE, FP8_BY_ADDS)
        vq, vs = _quantize_fp8_rows(v.to(tl.float32), NATIVE_FP8, FP8_NEAR_TIE, FP8_BY_ADDS)
        ks, vs = ks.to(tl.float16), vs.to(tl.float16)
    else:
        c = byte[None, :, None] * PER + tl.arange(0, PER)[None, None, :]  # [1, NB, PER] channel
        h3 = h[:, None, None]
        mask = (h3 < NUM_KV_HEADS) & (c < HEAD_DIM)
        k = tl.load(k_ptr + tok * stride_k_tok + h3 * stride_k_head + c, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok * stride_v_tok + h3 * stride_v_head + c, mask=mask, other=0.0).to(tl.float32)
        kq, ks, kz = _quantize_rows(k, BITS)
        vq, vs, vz = _quantize_rows(v, BITS)
    tl.store(k_codes_ptr + codes_dst, kq, mask=codes_mask)
    tl.store(v_codes_ptr + codes_dst, vq, mask=codes_mask)
    tl.store(k_scale_ptr + meta_dst, ks, mask=meta_mask)
    tl.store(v_scale_ptr + meta_dst, vs, mask=meta_mask)
    if not FP8:
        tl.store(k_zero_ptr + meta_dst, kz, mask=meta_mask)
        tl.store(v_zero_ptr + meta_dst, vz, mask=meta_mask)


# ---- int4, int2 (KIVI): quantize the blocks that fill up this step ---------------------------
@triton.jit
def _kivi_flush_kernel(
    k_ptr, v_ptr, k_res_ptr, v_res_ptr, k_codes_ptr, v_codes_ptr, k_scale_ptr, k_min_ptr, v_scale_ptr, v_zero_ptr,
    flush_blocks_ptr, flush_ring_ptr, flush_prior_ptr, flush_start_ptr, sink_ptr, sink_scale_ptr, sink_zero_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_r_slot, stride_r_tok, stride_r_head,
    stride_c_block, stride_c_tok, stride_c_head, stride_m_block, stride_m_tok, stride_kc_block, stride_kc_head,
    HEAD_DIM: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr,
    SINK: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    num_kv_heads = tl.num_programs(1)
    block = tl.load(flush_blocks_ptr + row).to(tl.int64)
    if block < 0:  # padding row of a CUDA-graph batch
        return
    slot = tl.load(flush_ring_ptr + row).to(tl.int64)
    prior = tl.load(flush_prior_ptr + row)
    start = tl.load(flush_start_ptr + row).to(tl.int64)
    PER: tl.constexpr = 8 // BITS
    t = tl.arange(0, BLOCK_SIZE)
    byte = tl.arange(0, BLOCK_BYTES)
    c = byte[None, :, None] * PER + tl.arange(0, PER)[None, None, :]  # [1, NB, PER]
    t3 = t[:, None, None]
    cmask = c < HEAD_DIM
    old = (t3 < prior) & cmask  # the block's first `prior` tokens: in the ring
    new = (t3 >= prior) & cmask  # the rest: this step's tokens from flat index `start`
    res = slot * stride_r_slot + t3 * stride_r_tok + h * stride_r_head + c
    src = start + t3 - prior
    res_ty = k_res_ptr.dtype.element_ty  # new tokens pass through the model dtype, as in the ref
    k = tl.where(old, tl.load(k_res_ptr + res, mask=old, other=0.0).to(tl.float32),
                 tl.load(k_ptr + src * stride_k_tok + h * stride_k_head + c, mask=new, other=0.0)
                 .to(res_ty).to(tl.float32))
    v = tl.where(old, tl.load(v_res_ptr + res, mask=old, other=0.0).to(tl.float32),
                 tl.load(v_ptr + src * stride_v_tok + h * stride_v_head + c, mask=new, other=0.0)
                 .to(res_ty).to(tl.float32))

    codes_dst = block * stride_c_block + t[:, None] * stride_c_tok + h * stride_c_head + byte[None, :]
    codes_mask = byte[None, :] < HEAD_DIM // PER
    kq, ks, km = _quantize_columns(k, BITS)
    tl.store(k_codes_ptr + codes_dst, kq, mask=codes_mask)
    kc = block * stride_kc_block + h * stride_kc_head + c.reshape(BLOCK_BYTES, PER)
    tl.store(k_scale_ptr + kc, ks, mask=cmask.reshape(BLOCK_BYTES, PER))
    tl.store(k_min_ptr + kc, km, mask=cmask.reshape(BLOCK_BYTES, PER))
    vq, vs, vz = _quantize_rows(v, BITS)
    tl.store(v_codes_ptr + codes_dst, vq, mask=codes_mask)
    meta_dst = block * stride_m_block + t * stride_m_tok + h
    tl.store(v_scale_ptr + meta_dst, vs)
    tl.store(v_zero_ptr + meta_dst, vz)
    if SINK:  # the block's first token at int8 per token: sink [nb, 2 (K, V), h, d]
        _store_sink(k, (block * 2) * num_kv_heads + h, sink_ptr, sink_scale_ptr, sink_zero_ptr, HEAD_DIM)
        _store_sink(v, (block * 2 + 1) * num_kv_heads + h, sink_ptr, sink_scale_ptr, sink_zero_ptr, HEAD_DIM)


@triton.jit
def _store_sink(x, at, sink_ptr, sink_scale_ptr, sink_zero_ptr, HEAD_DIM: tl.constexpr):
    """Token 0 of a block's x [T, NB, PER] (float32, channel c at [c // PER, c % PER]) at int8,
    to row `at` of the sink codes [.., d] and metadata [..]."""
    C: tl.constexpr = x.shape[1] * x.shape[2]
    t = tl.arange(0, x.shape[0])[:, None, None]
    first = tl.reshape(tl.sum(tl.where(t == 0, x, 0.0), axis=0), (1, C, 1))
    codes, scale, zero = _quantize_rows(first, 8)
    ch = tl.arange(0, C)
    tl.store(sink_ptr + at * HEAD_DIM + ch, tl.reshape(codes, (C,)), mask=ch < HEAD_DIM)
    tl.store(sink_scale_ptr + at, tl.sum(scale, axis=0))
    tl.store(sink_zero_ptr + at, tl.sum(zero, axis=0))


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata) -> None:
    """The Ops entry point, same arguments as kv_write.write_kv_ref: k, v [num_tokens,
    num_kv_heads, head_dim] (any token/head strides, last dim contiguous)."""
    fmt = cache.fmt
    if not fmt.quantized:
        write_kv_unquantized(k, v, cache.k, cache.v, meta.slot_mapping)
    elif fmt.kivi:
        plan = meta.kivi
        _kivi_flush(k, v, cache, plan.flush_blocks, plan.flush_ring, plan.flush_prior, plan.flush_start)
        write_kv_unquantized(k, v, cache.k_ring, cache.v_ring, plan.ring_mapping)
    else:
        _write_kv_per_token(k, v, cache, meta.slot_mapping)


def _check_layout(k, v, cache: LayerKVCache) -> None:
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert cache.k.is_contiguous() and cache.v.is_contiguous()
    assert cache.v_scale.is_contiguous() and (cache.v_zero is None or cache.v_zero.is_contiguous())


def _write_kv_per_token(k, v, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    fmt = cache.fmt
    _check_layout(k, v, cache)
    if num_tokens == 0:
        return
    # fp8 codes are stored as their bit patterns (see _fp8_e4m3_bits).
    k_codes, v_codes = (cache.k.view(torch.uint8), cache.v.view(torch.uint8)) if fmt.fp8 else (cache.k, cache.v)
    zeros = (cache.k_scale, cache.v_scale) if fmt.fp8 else (cache.k_zero, cache.v_zero)  # unused for fp8
    nbytes = fmt.codes_dim(head_dim)
    _write_kv_quant_kernel[(num_tokens,)](
        k, v, k_codes, v_codes, cache.k_scale, zeros[0], cache.v_scale, zeros[1], slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2), cache.v_scale.stride(0), cache.v_scale.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_BYTES=triton.next_power_of_2(nbytes), BLOCK_SIZE=cache.block_size, BITS=fmt.bits, FP8=fmt.fp8,
        NATIVE_FP8=fmt.fp8 and native_fp8(k.device), FP8_NEAR_TIE=FP8_NEAR_TIE, FP8_BY_ADDS=FP8_SCREEN_BY_ADDS,
        num_warps=4,
    )


def _kivi_flush(k, v, cache: LayerKVCache, blocks, residual, prior, start) -> None:
    """Quantize blocks `blocks` (< 0: skipped) whole; see KiviPlan for the other arguments."""
    num_kv_heads, head_dim = k.shape[1:]
    _check_layout(k, v, cache)
    assert cache.k_ring.stride() == cache.v_ring.stride() and cache.k_scale.is_contiguous()
    if blocks.shape[0] == 0:
        return
    res = cache.k_ring
    sink = (cache.sink, cache.sink_scale, cache.sink_zero) if cache.fmt.sink else (cache.k,) * 3  # stand-ins
    _kivi_flush_kernel[(blocks.shape[0], num_kv_heads)](
        k, v, cache.k_ring, cache.v_ring, cache.k, cache.v, cache.k_scale, cache.k_zero,
        cache.v_scale, cache.v_zero, blocks, residual, prior, start, *sink,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        res.stride(0), res.stride(1), res.stride(2),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2), cache.v_scale.stride(0), cache.v_scale.stride(1),
        cache.k_scale.stride(0), cache.k_scale.stride(1),
        HEAD_DIM=head_dim, BLOCK_BYTES=triton.next_power_of_2(cache.fmt.codes_dim(head_dim)),
        BLOCK_SIZE=cache.block_size, BITS=cache.fmt.bits, SINK=cache.fmt.sink, num_warps=4,
    )


def write_kv_unquantized(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (any token/head strides, last dim
    contiguous); caches: [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping:
    [num_tokens] int64, a slot < 0 skips its token."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4,
    )
