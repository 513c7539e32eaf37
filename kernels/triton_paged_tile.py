"""One online-softmax step over a tile of paged K/V: shared by the decode and prefill kernels.

A tile of one sequence's token positions is gathered through its block-table row. Scores are
in the log2 domain (the softmax scale carries log2(e)) so the kernels use exp2.
Variants (runtime values, each behind a constexpr flag so the plain kernels compile without
them): WINDOW, a sliding window (a row at position p sees keys p-window+1..p); SOFTCAP,
Gemma 2's cap * tanh(score / cap), applied in the log2 domain with cap * log2(e), which is
the same map (tanh(s log2e / (cap log2e)) = tanh(s / cap)).

`attend_tile` reads a cache in the model dtype (and an int2/int4 cache's full-precision
residual); `attend_tile_quantized` reads codes (kernels/kv_format.py) and never builds a
dequantized K or V tile: the codes go to the tensor cores as small integers (exact in
16-bit floats) and each affine dequantization is folded into the dot's other operand or its
result, so per element the tile only costs an unpack:
- per-token K (x = (c - z) * s[n]): scores = (q . c - z[n] * sum(q)) * s[n], on [M, N];
- per-channel K (KIVI, x = c * s[d] + m[d], one range per block): scores = (q * s) . c +
  q . m, q scaled once per tile on [M, D] (per step: each row by its own lane's block);
- per-token V: acc += (p * s[n]) . c - (p * s[n]) . z, on [M, N];
- fp8: codes convert to the dot's dtype, the scale is applied like the int ones.
Codes in a 16-bit dtype are made without an int-to-float conversion: OR-ing a code into the
bits of 1024.0 (fp16) or 128.0 (bf16, codes < 128) gives the float CODE_BIAS + code, and
CODE_BIAS is subtracted with the zero point.
Sub-byte codes are read as words (int16 for int4: 4 codes; bytes for int2) and never put back
in channel order: the codes at bit i * bits of every word (plane i: channels c with
c % planes == i) go to the tensor cores as they lie, against q's plane i for K and into acc's
plane i for V. Interleaving them per tile cost a register shuffle through shared memory per K
and V tile; the planes are split from q and joined into acc once per program
(`split_planes`, `join_planes`). int16 words reach the dots' register layout through
ldmatrix, as a bf16 tile would; on the GPU a plane of two words takes one shift and one lop3
(`unpack_asm`), where Triton's own 16-bit shifts and masks cost about three times that.
8-bit codes (fp8, int8) can be read the same way, as int16 pairs of two planes (decode's
DECODE_CODE_PAIRS, `word_bits`): a plane of two words is one prmt (fp8: and one packed
e4m3 -> fp16 conversion), and the tiles' trips to the dots' layout move half the elements
(V's by ldmatrix.trans, where a byte tile takes a shuffle through shared memory).
With all that, a quantized tile's cost is the work on its rows, not its bytes, and decode
pads a GQA group of 4 heads to the dots' 16 rows: `attend_tile_quantized` lets the rows be
lanes that each attend a tile of their own (one step: a tile per lane), so the padding rows
do useful work and the per-row work is shared by the lanes' tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.attention import KiviPlan
from wattserve.kernels.kv_format import KVFormat, LayerKVCache
from wattserve.kernels.triton_interpreter import interpreting

LOG2E = 1.4426950408889634  # the launchers pass scale * LOG2E


def variant_args(sliding_window: int | None, softcap: float | None) -> tuple[int, float]:
    """The kernels' (window, softcap) runtime arguments: placeholders where a variant is off
    (its constexpr flag is then False and the value unread)."""
    return (sliding_window or 0), (1.0 if softcap is None else softcap * LOG2E)


@triton.jit
def _kv_offsets(table_ptr, tok, valid, kv_head, stride_block, stride_tok, stride_head,
                HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """[N, HEAD_DIM] offsets of positions `tok` [N] in a [num_blocks, block_size, kvh, d]
    cache, for K and V alike."""
    block = tl.load(table_ptr + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    row = block * stride_block + (tok % BLOCK_SIZE) * stride_tok + kv_head * stride_head
    return row[:, None] + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_kv(cache_ptr, offsets, valid):
    """Invalid positions read as 0 without touching the cache (their slots may hold anything,
    NaN included)."""
    return tl.load(cache_ptr + offsets, mask=valid[:, None], other=0.0)


@triton.jit
def softcap_scores(s, cap_log2):
    """cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp2
    overflows to inf, giving 1; underflows to 0, giving -1)."""
    return cap_log2 * (1.0 - 2.0 / (tl.exp2(2.8853900817779268 * s / cap_log2) + 1.0))  # 2 log2(e)


@triton.jit
def in_window(rows, q_pos, window, WINDOW: tl.constexpr):
    """`rows` [M] where position 0 lies inside each row's window (for `attend_sink`)."""
    if WINDOW:
        rows = rows & (q_pos < window)
    return rows


@triton.jit
def attend_tile(
    acc, m, l, q, q_pos, start, kv_end, table_ptr, k_cache_ptr, v_cache_ptr, kv_head,
    stride_block, stride_tok, stride_head, scale_log2, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Fold keys start .. start+BLOCK_N-1 (those < kv_end) into the running softmax.

    acc: [M, HEAD_DIM], m, l: [M] float32 (running max, sum); q: [M, HEAD_DIM] in the cache
    dtype; q_pos: [M] each row's position, used when CAUSAL (a row sees keys <= its
    position). Without CAUSAL every key of the tile must be visible to every row, unless
    WINDOW hides the keys before a row's window.
    """
    tok = start + tl.arange(0, BLOCK_N)
    valid = tok < kv_end
    offsets = _kv_offsets(table_ptr, tok, valid, kv_head, stride_block, stride_tok, stride_head,
                          HEAD_DIM, BLOCK_SIZE)
    # Both loads issued before the first use: V's latency hides behind K's and the dot.
    k = _load_kv(k_cache_ptr, offsets, valid)
    v = _load_kv(v_cache_ptr, offsets, valid)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if SOFTCAP:
        s = softcap_scores(s, softcap)
    visible = valid[None, :] & (tok[None, :] <= q_pos[:, None])
    if WINDOW:
        visible = visible & (tok[None, :] > q_pos[:, None] - window)
    m_new, l, p, alpha = _softmax_step(m, l, s, visible, CAUSAL or WINDOW)
    acc = acc * alpha[:, None]
    acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l


@triton.jit
def _softmax_step(m, l, s, visible, MASK: tl.constexpr):
    """The online-softmax update for scores s [M, N], where `visible` (when MASK): (max, sum,
    p, alpha), alpha [M] the factor that rescales the accumulator. A row that has seen no
    visible key, this tile included (decode's lanes past their last tile), keeps max -inf,
    sum 0 and gets alpha 0, not NaN."""
    if MASK:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    return m_new, l, p, alpha


@triton.jit
def sink_row(sink_ptr, sink_scale_ptr, sink_zero_ptr, row, dtype: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row `row` of the int8 sink copies, dequantized (kv_quant's per-token encoding) and
    rounded to `dtype` as the reference reads it; float32 [HEAD_DIM]."""
    codes = tl.load(sink_ptr + row * HEAD_DIM + tl.arange(0, HEAD_DIM)).to(tl.float32)
    x = (codes - tl.load(sink_zero_ptr + row).to(tl.float32)) * tl.load(sink_scale_ptr + row).to(tl.float32)
    return x.to(dtype).to(tl.float32)


@triton.jit
def attend_sink(acc, m, l, q, rows, table_ptr, sink_ptr, sink_scale_ptr, sink_zero_ptr, kv_head, num_kv_heads,
                scale_log2, softcap, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr):
    """A `sink` format's position 0, read from its block's int8 copy (kernels/kv_format.py),
    folded into the online softmax (acc [M, HEAD_DIM], m, l) of the rows where `rows` [M]
    holds; the quantized tiles skip position 0."""
    base = tl.load(table_ptr).to(tl.int64) * 2 * num_kv_heads + kv_head  # [nb, 2, h]: K, then V
    k = sink_row(sink_ptr, sink_scale_ptr, sink_zero_ptr, base, q.dtype, HEAD_DIM)
    v = sink_row(sink_ptr, sink_scale_ptr, sink_zero_ptr, base + num_kv_heads, q.dtype, HEAD_DIM)
    s = tl.sum(q.to(tl.float32) * k[None, :], axis=1) * scale_log2
    if SOFTCAP:
        s = softcap_scores(s, softcap)
    s = tl.where(rows, s, float("-inf"))
    m_new = tl.maximum(m, s)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_sub)
    p = tl.exp2(s - m_sub)
    return acc * alpha[:, None] + p[:, None] * v[None, :], m_new, l * alpha + p


@triton.jit
def _widen(c, dtype: tl.constexpr, CODE_MAGIC: tl.constexpr):
    """int16 codes -> dtype, plus CODE_BIAS when CODE_MAGIC (the bits of CODE_BIAS)."""
    if CODE_MAGIC:
        return (c | CODE_MAGIC).to(dtype, bitcast=True)
    else:
        return c.to(dtype)


@triton.jit
def unpack_planes(w, dtype: tl.constexpr, PLANES: tl.constexpr, KV_BITS: tl.constexpr, FP8: tl.constexpr,
                  CODE_MAGIC: tl.constexpr, UNPACK_ASM: tl.constexpr):
    """Code words [N, W] (bytes or int16; fp8 values as bytes or as int16 pairs) -> a tuple of
    PLANES tensors [N, W] in dtype: plane i holds the codes at bit i * KV_BITS of each word,
    the channels c with c % PLANES == i (see `split_planes`). UNPACK_ASM (`unpack_asm`, GPU
    only): one plane at a time, two codes per instruction (fp8: a permute and a packed
    conversion), the same function as the plain Triton below, which is what the interpreter
    runs; a plane apiece lets each dot consume its plane before the next is made."""
    if FP8 and PLANES == 1:  # bytes: a masked load's `other` cannot be an fp8 in the interpreter
        return (w.to(tl.float8e4nv, bitcast=True).to(dtype),)
    x = w.to(tl.int16)
    if KV_BITS == 8 and PLANES == 1:
        return (_widen(x, dtype, CODE_MAGIC),)
    planes = ()
    for i in tl.static_range(PLANES):
        if len(UNPACK_ASM) > 0:
            # The dtype spelled out: inline asm takes no dtype passed in as a constexpr.
            if dtype == tl.bfloat16:
                plane = tl.inline_asm_elementwise(UNPACK_ASM[i], "=r,r", [x], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                plane = tl.inline_asm_elementwise(UNPACK_ASM[i], "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
        elif FP8:  # int16 pairs: byte i of each word is an e4m3 value
            plane = ((x >> (i * 8)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(dtype)
        else:
            plane = _widen((x >> (i * KV_BITS)) & ((1 << KV_BITS) - 1), dtype, CODE_MAGIC)
        planes = planes + (plane,)
    return planes


def unpack_asm(bits: int, planes: int, magic: int, fp8: bool = False) -> tuple[str, ...]:
    """PTX for `unpack_planes`, plane by plane, on a 32-bit register of two int16 code words
    (its result: the plane's two values, word 0's in the low half).
    Sub-byte codes: (word >> i * bits) & mask | magic puts plane i's code of each word into
    the low bits of the float CODE_BIAS in its 16-bit half, one lop3 for both. Byte pairs
    (int8, fp8): plane i is byte i of each word, bytes i and i + 2 of the register; int8: one
    prmt places them under the magic's high byte (1024 + code in fp16), where a shift and a
    lop3 take two; fp8: one prmt gathers them into 16 bits and cvt.rn.f16x2.e4m3x2 converts
    both (exact: every e4m3 value is an fp16).
    int8's magic bytes are prmt's first source (bytes 0..3, the words' bytes 4..7): ptxas
    then keeps them in one register and the selector is an immediate. As the second source
    it made the magic the immediate and moved each selector into a register before every
    prmt (sm_90, the decode main loop: 972 instructions per tile against 884)."""
    if bits == 8:
        if fp8:
            return tuple(f"{{ .reg .b32 t; .reg .b16 lo, hi; prmt.b32 t, $1, 0, {0x20 + 0x11 * i:#x}; "
                         f"mov.b32 {{lo, hi}}, t; cvt.rn.f16x2.e4m3x2 $0, lo; }}" for i in range(planes))
        magic4 = (magic >> 8) * 0x01010101
        return tuple(f"prmt.b32 $0, {magic4:#x}, $1, {0x0604 + 0x101 * i:#x};" for i in range(planes))
    mask = (1 << bits) - 1
    mask2, magic2 = mask | mask << 16, magic | magic << 16
    lop3 = f"{mask2:#x}, {magic2:#x}, 0xEA;"  # 0xEA: (a & b) | c
    return tuple(f"lop3.b32 $0, $1, {lop3}" if i == 0 else
                 f"{{ .reg .b32 t; shr.b32 t, $1, {i * bits}; lop3.b32 $0, t, {lop3} }}" for i in range(planes))


@triton.jit
def _deinterleave(x):
    """[M, D] -> (even columns, odd columns), each [M, D // 2]."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def split_planes(x, PLANES: tl.constexpr):
    """x [M, HEAD_DIM] -> a tuple of its PLANES planes [M, HEAD_DIM // PLANES]: plane i holds
    the channels c with c % PLANES == i, the channels whose codes sit at bit i * KV_BITS of
    each code word (`unpack_planes`). Done once per program, outside the tile loop."""
    if PLANES == 1:
        return (x,)
    elif PLANES == 2:
        return _deinterleave(x)
    else:
        even, odd = _deinterleave(x)
        c0, c2 = _deinterleave(even)
        c1, c3 = _deinterleave(odd)
        return (c0, c1, c2, c3)


@triton.jit
def join_planes(planes):
    """Inverse of `split_planes`."""
    if len(planes) == 1:
        return planes[0]
    elif len(planes) == 2:
        return tl.interleave(planes[0], planes[1])
    else:
        return tl.interleave(tl.interleave(planes[0], planes[2]), tl.interleave(planes[1], planes[3]))


@triton.jit
def codes_query(q, PLANES: tl.constexpr, CODES_F16: tl.constexpr):
    """q [M, HEAD_DIM] as the quantized tiles' dots take it: (its planes, `split_planes`, and
    its row sums, float32 [M], of the same values). CODES_F16: in fp16 (a bf16 model's q,
    clamped to fp16's range; bf16 values inside it convert exactly), see `code_dtype`."""
    if CODES_F16:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return split_planes(q, PLANES), tl.sum(q.to(tl.float32), axis=1)


@triton.jit
def join_units(accs, u, V_UNIT: tl.constexpr):
    """The quantized tiles' accumulator planes back as one [M, HEAD_DIM] (`join_planes`), in
    true units (see `attend_tile_quantized`'s V_UNIT)."""
    acc = join_planes(accs)
    if V_UNIT:
        acc = acc * u[:, None]
    return acc


@triton.jit
def tile_blocks(table_ptr, start, end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block-table entries of the tile of positions start.. (start a multiple of BLOCK_N):
    one (a scalar) when the tile lies in one block, else [BLOCK_N], one per position; 0, a
    block that exists, for positions from `end` on."""
    if BLOCK_N <= BLOCK_SIZE:
        return tl.load(table_ptr + start // BLOCK_SIZE, mask=start < end, other=0)
    else:
        tok = start + tl.arange(0, BLOCK_N)
        return tl.load(table_ptr + tok // BLOCK_SIZE, mask=tok < end, other=0)


@triton.jit
def _tile_ptrs(ptr, blocks, start, stride_block, stride_tok, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to the tile's positions in the paged tensor at `ptr`, `blocks` from
    `tile_blocks` (or `_per_row` of them), start a scalar (or [M, 1]): [BLOCK_N] (or
    [M, BLOCK_N]). A tile in one block takes one 64-bit product and 32-bit offsets from
    there; positions split into block and in-block parts without a per-position division.
    A tile as long as a block starts at its first position."""
    n = tl.arange(0, BLOCK_N)
    if BLOCK_N == BLOCK_SIZE:
        return (ptr + blocks.to(tl.int64) * stride_block) + n * stride_tok
    elif BLOCK_N < BLOCK_SIZE:
        return (ptr + blocks.to(tl.int64) * stride_block) + (start % BLOCK_SIZE + n) * stride_tok
    else:
        return ptr + blocks.to(tl.int64) * stride_block + (n % BLOCK_SIZE) * stride_tok


@triton.jit
def _per_row(lane, vals, VECTORS: tl.constexpr):
    """Lanes' values (a tuple: scalars, or [N] tensors if VECTORS) -> each row's, by its lane
    [M]: [M, 1] (or [M, N]). One lane: its value as it is, which broadcasts over the rows
    from the layout its producer chose (a 1-D load of per-token scales lands in the layout
    of the scores' columns; a [1, N] one would take a layout conversion through shared
    memory per tile)."""
    if len(vals) == 1:
        rows = vals[0]
    elif not VECTORS:
        rows = tl.where(lane == 0, vals[0], vals[1])
        for j in tl.static_range(2, len(vals)):
            rows = tl.where(lane == j, vals[j], rows)
        rows = rows[:, None]
    else:
        rows = tl.where((lane == 0)[:, None], vals[0][None, :], vals[1][None, :])
        for j in tl.static_range(2, len(vals)):
            rows = tl.where((lane == j)[:, None], vals[j][None, :], rows)
    return rows


@triton.jit
def tile_scales(
    lane, blocks, starts, end, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, kv_head,
    stride_m_block, stride_m_tok, stride_kc_block,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, KIVI: tl.constexpr,
):
    """The scales and zero points `attend_tile_quantized` takes for the tiles at `starts` (one
    per lane, see there), whose block-table entries are `blocks` (`tile_blocks` each):
    (k_scale, k_zero, v_scale, v_zero), float32, per token [BLOCK_N] (0 from position `end`
    on), KIVI keys' scale and minimum per channel [HEAD_DIM]; with several lanes, one row
    of those per row of the tile ([M, BLOCK_N], [M, HEAD_DIM]: row r, its lane's tile). fp8
    has no zero points (v_scale stands in). Separate from the tile so that the decode loop
    can load them a step early."""
    start = _per_row(lane, starts, False)
    block = _per_row(lane, blocks, BLOCK_N > BLOCK_SIZE)
    valid = start + tl.arange(0, BLOCK_N) < end
    v_scale = tl.load(_tile_ptrs(v_scale_ptr + kv_head, block, start, stride_m_block, stride_m_tok, BLOCK_SIZE,
                                 BLOCK_N), mask=valid, other=0.0).to(tl.float32)
    v_zero = v_scale
    if not FP8:
        v_zero = tl.load(_tile_ptrs(v_zero_ptr + kv_head, block, start, stride_m_block, stride_m_tok, BLOCK_SIZE,
                                    BLOCK_N), mask=valid, other=0).to(tl.float32)
    if KIVI:  # each tile lies in one block: `block` is its entry
        kc = block.to(tl.int64) * stride_kc_block + kv_head * HEAD_DIM + tl.arange(0, HEAD_DIM)
        k_scale = tl.load(k_scale_ptr + kc).to(tl.float32)
        k_zero = tl.load(k_zero_ptr + kc).to(tl.float32)
    else:
        k_scale = tl.load(_tile_ptrs(k_scale_ptr + kv_head, block, start, stride_m_block, stride_m_tok, BLOCK_SIZE,
                                     BLOCK_N), mask=valid, other=0.0).to(tl.float32)
        k_zero = k_scale
        if not FP8:
            k_zero = tl.load(_tile_ptrs(k_zero_ptr + kv_head, block, start, stride_m_block, stride_m_tok,
                                        BLOCK_SIZE, BLOCK_N), mask=valid, other=0).to(tl.float32)
    return k_scale, k_zero, v_scale, v_zero


@triton.jit
def _lane_codes(ptr, blocks, start, kv_end, kv_head, stride_block, stride_tok, stride_head,
                HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PLANES: tl.constexpr,
                WHOLE: tl.constexpr):
    """One lane's tile of code words [BLOCK_N, HEAD_DIM // PLANES]: 0 from position kv_end on
    (their slots may hold anything; 0 codes and 0 scales keep them finite until masked).
    WHOLE: the tile is all before kv_end or all after. `blocks`: its `tile_blocks`."""
    rows = _tile_ptrs(ptr + kv_head * stride_head, blocks, start, stride_block, stride_tok, BLOCK_SIZE, BLOCK_N)
    if WHOLE:
        valid = start < kv_end
    else:
        valid = (start + tl.arange(0, BLOCK_N) < kv_end)[:, None]
    return tl.load(rows[:, None] + tl.arange(0, HEAD_DIM // PLANES)[None, :], mask=valid, other=0)


@triton.jit
def attend_tile_quantized(
    accs, m, l, u, q, qs, q_sum, q_pos, lane, starts, kv_end, table_ptr, k_ptr, v_ptr, scales, kv_head,
    stride_block, stride_tok, stride_head, scale_log2, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_BITS: tl.constexpr, FP8: tl.constexpr, KIVI: tl.constexpr, CODE_MAGIC: tl.constexpr,
    CODE_BIAS: tl.constexpr, UNPACK_ASM: tl.constexpr, SINK: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, V_UNIT: tl.constexpr,
):
    """`attend_tile` over a quantized cache (code words [num_blocks, block_size, kvh, words]), in
    planes (`split_planes`): qs and accs are q's and acc's planes, so each plane of codes goes
    to the tensor cores as it lies in the words, never interleaved into channel order.

    Lanes: `starts` holds one tile start per lane and row r attends the tile of lane
    lane[r] ([M]; unread with one lane), so rows that would only pad the dots' 16 (decode's
    GQA group) each fold in a tile of their own. The dots run over
    all rows for every lane's tile, which costs the tensor cores nothing more than padding
    rows did; each row keeps its own lane's scores and probabilities, and the per-row work
    on [M, BLOCK_N] and [M, HEAD_DIM] (softmax, scales, KIVI's q * scale) is shared by all
    the lanes' tiles.
    q: [M, HEAD_DIM] in the model dtype, qs and q_sum from `codes_query`; scales:
    `tile_scales` of the lanes' tiles. V_UNIT (fp16 dots): accs are kept in units u [M] per
    row (`join_units`), the largest V scale of the row's latest tile over 2**15, so that
    p * scale / u <= 2**15 fits fp16 and a small p keeps fp16's 11 bits instead of falling
    into its subnormals; the unit's change rides on the softmax's rescale of accs. Positions from kv_end on are masked with CAUSAL or
    lanes (one lane's tiles run out first); otherwise every position is visible to every
    row. KIVI: each tile lies in one block (BLOCK_N divides BLOCK_SIZE) before the sequence's
    ring start. SINK: position 0 is skipped (`attend_sink` reads it)."""
    PLANES: tl.constexpr = len(qs)
    LANES: tl.constexpr = len(starts)
    MASK: tl.constexpr = CAUSAL or LANES > 1 or SINK or WINDOW
    dtype: tl.constexpr = qs[0].dtype
    k_scale, k_zero, v_scale, v_zero = scales
    if KIVI:  # q * k_scale against the codes; the minimum and CODE_BIAS in one per-row bias
        qf = q.to(tl.float32)
        q_scaled = (qf * k_scale).to(dtype)
        bias = tl.sum(qf * k_zero - CODE_BIAS * q_scaled.to(tl.float32), axis=1)
        q_k = split_planes(q_scaled, PLANES)
    else:
        q_k = qs
    # Every load issued before the first use: V's latency hides behind K's and the dots. The
    # block-table entries are loaded here, from the tiles' starts alone: the pipeliner then
    # issues them and the codes stages ahead (it does not for an address carried in from an
    # earlier iteration).
    kws = ()
    vws = ()
    for j in tl.static_range(LANES):
        blocks = tile_blocks(table_ptr, starts[j], kv_end, BLOCK_SIZE, BLOCK_N)
        kws = kws + (_lane_codes(k_ptr, blocks, starts[j], kv_end, kv_head, stride_block, stride_tok, stride_head,
                                 HEAD_DIM, BLOCK_SIZE, BLOCK_N, PLANES, KIVI),)
        vws = vws + (_lane_codes(v_ptr, blocks, starts[j], kv_end, kv_head, stride_block, stride_tok, stride_head,
                                 HEAD_DIM, BLOCK_SIZE, BLOCK_N, PLANES, KIVI),)
    s = tl.zeros([q.shape[0], BLOCK_N], tl.float32)
    for j in tl.static_range(LANES):
        k_planes = unpack_planes(kws[j], dtype, PLANES, KV_BITS, FP8, CODE_MAGIC, UNPACK_ASM)
        s_j = tl.zeros([q.shape[0], BLOCK_N], tl.float32)
        for i in tl.static_range(PLANES):
            s_j = tl.dot(q_k[i], tl.trans(k_planes[i]), s_j, input_precision=DOT_PRECISION)
        if LANES > 1:
            s = tl.where((lane == j)[:, None], s_j, s)
        else:
            s = s_j
    if KIVI:
        s = (s + bias[:, None]) * scale_log2
    else:
        if not FP8:
            s -= q_sum[:, None] * (CODE_BIAS + k_zero)
        s *= k_scale * scale_log2
    if SOFTCAP:
        s = softcap_scores(s, softcap)
    visible = None
    if MASK:  # made here, not live across the dots
        tok = _per_row(lane, starts, False) + tl.arange(0, BLOCK_N)  # [M, N] ([N]: one lane)
        visible = tok < kv_end
        if SINK:  # position 0 (`attend_sink`): a mask, 3% faster than a branch on the tile's start
            visible = visible & (tok > 0)
        if CAUSAL:
            visible = visible & (tok <= q_pos[:, None])
        if WINDOW:
            visible = visible & (tok > q_pos[:, None] - window)
    m, l, p, alpha = _softmax_step(m, l, s, visible, MASK)
    if V_UNIT:
        top = tl.max(v_scale, axis=len(v_scale.shape) - 1) * (1.0 / 32768)  # [M]; one lane: a scalar
        u_new = tl.where(top > 0, top, u)  # a lane past its sequence's end has scales 0: unit kept
        alpha = alpha * (u / u_new)
        u = u_new
        inv = 1.0 / tl.maximum(top, 1e-30)  # scales all 0 where top is
        if LANES == 1:  # on the scales' [N], not on p's [M, N]: the prefill tile spilled registers
            v_scale = v_scale * inv
        else:
            v_scale = v_scale * inv[:, None]
    p_scaled = (p * v_scale).to(dtype)
    if not FP8:  # the zero point is per token: the same correction for every channel
        v_bias = tl.sum(p_scaled.to(tl.float32) * (CODE_BIAS + v_zero), axis=1)[:, None]
    new_accs = accs
    for j in tl.static_range(LANES):
        v_planes = unpack_planes(vws[j], dtype, PLANES, KV_BITS, FP8, CODE_MAGIC, UNPACK_ASM)
        p_j = p_scaled
        if LANES > 1:
            p_j = tl.where((lane == j)[:, None], p_scaled, 0.0)
        accs_j = ()
        for i in tl.static_range(PLANES):
            acc = new_accs[i]
            if j == 0:  # rescaled at its first dot: the live ranges of one lane's tile
                acc = acc * alpha[:, None]
            accs_j = accs_j + (tl.dot(p_j, v_planes[i], acc, input_precision=DOT_PRECISION),)
        new_accs = accs_j
    if not FP8:
        accs_j = ()
        for i in tl.static_range(PLANES):
            accs_j = accs_j + (new_accs[i] - v_bias,)
        new_accs = accs_j
    return new_accs, m, l, u


def word_bits(fmt: KVFormat, head_dim: int, pairs: bool = False) -> int:
    """Bits of the code words the kernels read (`unpack_planes`): int16 for int4 (4 planes)
    where each plane keeps the 16 channels a dot needs, and with `pairs` for 8-bit codes
    (fp8, int8: 2 planes, head_dim >= 32), else bytes. int16 words reach the dots' register
    layout through ldmatrix (V's through ldmatrix.trans) with half the elements a byte tile
    moves; bytes take a shuffle through shared memory."""
    if fmt.bits == 4 and not fmt.fp8 and head_dim >= 64:
        return 16
    return 16 if pairs and fmt.bits == 8 and head_dim >= 32 else 8


def kv_codes(cache: LayerKVCache, pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V tensors the kernels take: code words (`word_bits`), fp8 codes as bytes
    (or int16 pairs)."""
    fmt = cache.fmt
    if not fmt.quantized:
        return cache.k, cache.v
    head_dim = cache.k.shape[-1] * 8 // fmt.bits
    k, v = cache.k.view(torch.uint8), cache.v.view(torch.uint8)
    if word_bits(fmt, head_dim, pairs) == 16:
        return k.view(torch.int16), v.view(torch.int16)
    return k, v


def code_dtype(fmt: KVFormat, dtype: torch.dtype, codes_f16: bool) -> torch.dtype:
    """The dtype the quantized tiles' dots take for queries in `dtype`: with codes_f16, fp16
    for 8-bit codes of a bf16 model. Into bf16 they go by one conversion instruction per
    value read (int8: I2F; fp8: e4m3 -> fp16 -> bf16, F2F; seen in the sm_90 SASS), a kind
    the CUDA guide rates at 16 per clock per SM against 128 for a float add, and fp8 and int8
    decode ran at bf16's speed on the H200 (issue 23); into fp16 they go by a 16-bit OR (int8:
    1024 + code, `unpack_planes`) or a packed conversion of two (fp8)."""
    f16 = codes_f16 and fmt.quantized and fmt.bits == 8 and dtype == torch.bfloat16
    return torch.float16 if f16 else dtype


def cache_kernel_args(cache: LayerKVCache, dtype: torch.dtype, kivi: KiviPlan | None,
                      codes_f16: bool = False, pairs: bool = False, native: bool | None = None):
    """What the decode and prefill kernels pass through to the tile functions for `cache`'s
    format, queries in `dtype`, and for KIVI formats the step's plan: (tensors and strides,
    constexprs; the dots take `code_dtype(..., codes_f16)`). Absent tensors are stand-ins
    (cache.k) that the format's constexpr branches never read. pairs: 8-bit codes as int16
    words (`word_bits`; the K and V tensors from `kv_codes(cache, pairs)`). native: whether
    the kernel runs compiled for a GPU, with the inline PTX of `unpack_asm` (default: not
    under the interpreter and a CUDA cache; given, to compile for a GPU without one)."""
    fmt = cache.fmt
    if not fmt.quantized:
        return [cache.k] * 11 + [0] * 8, {"KV_BITS": 0, "FP8": False, "KIVI": False, "CODE_MAGIC": 0,
                                          "CODE_BIAS": 0.0, "PLANES": 1, "UNPACK_ASM": "", "SINK": False,
                                          "CODES_F16": False, "V_UNIT": False}
    model_dtype, dtype = dtype, code_dtype(fmt, dtype, codes_f16)
    assert cache.k.is_contiguous() and cache.v.is_contiguous() and cache.k.stride() == cache.v.stride()
    if cache.k.shape[-1] < 16:  # a row's bytes are a plane's channels: the dots' K, 16 at least
        raise ValueError(f"the Triton kernels read a {fmt.name} KV cache at head_dim >= {16 * 8 // fmt.bits}")
    assert cache.v_scale.is_contiguous() and cache.k_scale.is_contiguous()
    if fmt.fp8 or dtype == torch.float32:
        magic, bias = 0, 0.0
    elif dtype == torch.float16:
        magic, bias = 0x6400, 1024.0  # 1024 + c, c < 1024: fp16 has 10 mantissa bits
    elif dtype == torch.bfloat16 and fmt.bits <= 4:
        magic, bias = 0x4300, 128.0  # 128 + c, c < 128: bf16 has 7
    else:
        magic, bias = 0, 0.0
    zeros = (cache.k, cache.k) if fmt.fp8 else (cache.k_zero, cache.v_zero)
    stand_in = cache.k
    if fmt.kivi:
        res = cache.k_ring
        assert res.stride() == cache.v_ring.stride() and res.dtype == model_dtype and kivi is not None
        assert kivi.ring_tables.is_contiguous()
        residual = [cache.k_ring, cache.v_ring, kivi.ring_tables, kivi.ring_starts]
        ring_strides = [cache.k_scale.stride(0), res.stride(0), res.stride(1), res.stride(2),
                            kivi.ring_tables.stride(0)]
    else:
        residual, ring_strides = [stand_in] * 4, [0] * 5
    if fmt.sink:
        assert cache.sink.is_contiguous() and cache.sink_scale.is_contiguous() and cache.sink_zero.is_contiguous()
        sink = [cache.sink, cache.sink_scale, cache.sink_zero]
    else:
        sink = [stand_in] * 3
    tensors = [cache.k_scale, zeros[0], cache.v_scale, zeros[1], *residual, *sink,
               cache.v_scale.stride(0), cache.v_scale.stride(1), *ring_strides, cache.k.shape[2]]
    words = word_bits(fmt, cache.k.shape[-1] * 8 // fmt.bits, pairs)
    planes = words // fmt.bits
    # The interpreter runs no PTX; fp32 queries take codes by conversion (no magic), and so
    # do fp8 codes into bf16 dots (no packed e4m3 -> bf16 conversion on sm_90).
    if native is None:
        native = not interpreting() and cache.k.device.type == "cuda"
    asm_fits = dtype == torch.float16 if fmt.fp8 else magic != 0
    asm = unpack_asm(fmt.bits, planes, magic, fmt.fp8) if native and asm_fits and planes > 1 else ""
    constexprs = {"KV_BITS": fmt.bits, "FP8": fmt.fp8, "KIVI": fmt.kivi, "CODE_MAGIC": magic, "CODE_BIAS": bias,
                  "PLANES": planes, "UNPACK_ASM": asm, "SINK": fmt.sink, "CODES_F16": dtype != model_dtype,
                  "V_UNIT": dtype == torch.float16}
    return tensors, constexprs
