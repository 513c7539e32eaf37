"""Triton paged decode attention (one query token per sequence), split-K over the context.

Reference: `paged_decode_attention_ref` below (the general `paged_attention_ref` on a
decode-only batch).

Decode reads every cached K and V once and does little arithmetic with it, so the kernel is
written for memory bandwidth:
- GQA: one program serves all query heads of one kv head, so each K/V tile is read once
  (the group is padded to at least 16 rows for the tensor-core dot; the extra rows cost no
  memory traffic).
- Tiles of `tile_tokens` tokens (several cache blocks) gathered through the block table,
  software-pipelined `num_stages` deep, keep enough bytes in flight per SM.
- FlashDecoding: the context is split over `num_splits` programs when sequences x kv heads
  alone would leave SMs idle; a second, small kernel combines their partial
  (max, sum, acc), all float32.
- Quantized caches: the tiles are codes, dequantized in registers (triton_paged_tile.py), so
  the bytes read shrink with the codes; with int4/int2 (KIVI) keys each sequence's positions
  from its ring start on come from its full-precision ring, and int2's
  position 0 from its int8 sink copy. Their cost is then
  per-tile work, not bytes: the rows that only padded the group to 16 become lanes, each
  with its own tile of a step (lane j takes tiles t + j), and the lanes' partial softmaxes
  are merged per head at the end, as the splits' are. Llama-3.1-8B's 4 heads a kv head make
  4 lanes: a quarter of the softmax, scale and KIVI q-scaling work per tile, and 4 tiles
  of codes in flight per program (int4, batch 32 x 8k on an H100: 0.18 ms, the best of 2
  and 4 warps without lanes, -> 0.14 ms).
The number of splits comes from host-side shapes only (batch size, block-table width), and
each program reads its sequence's length on the device, so the launch never syncs and can be
captured in a CUDA graph. Each split takes an equal share of its own sequence's tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.attention import AttentionMetadata, KiviPlan, paged_attention_ref
from wattserve.kernels.kv_format import FORMATS, LayerKVCache
from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs
from wattserve.kernels.triton_paged_tile import (
    LOG2E,
    attend_sink,
    attend_tile,
    attend_tile_quantized,
    cache_kernel_args,
    code_dtype,
    codes_query,
    in_window,
    join_units,
    kv_codes,
    split_planes,
    tile_blocks,
    tile_scales,
    variant_args,
)


# (tile_tokens, num_stages, lanes) by --kv-cache-dtype (see paged_decode_attention_cache).
DEFAULTS = {"auto": (64, 3, 1), "fp8_e4m3": (128, 5, 1), "int8": (128, 7, 1), "int4": (64, 3, 4), "int2": (64, 5, 4)}
# fp8/int8 codes read as int16 pairs (triton_paged_tile.word_bits): two planes of bytes, split
# and converted two codes an instruction (unpack_asm), V into its dot through ldmatrix.trans.
# In the sm_90 SASS (batch 32 x 8k, Llama-3.1-8B shapes, the DEFAULTS above) the main loop per
# 32 KB of codes drops from 1,295 to 876 instructions (fp8) and from 1,603 to 884 (int8), the
# registers from 255 to 194-196; decode is instruction-bound there (H200: fp8 1.28x and int8
# 1.06x bf16's speed, where the bytes allow 2x). Off: not yet run on a GPU; the GPU tests in
# tests/test_triton_kv_quant.py check it and benchmarks/kv_quant_kernel_bench.py times both
# readings in one run ("+pairs" rows; --sweep adds depths and --max-registers 168, 3 programs
# an SM, which fp8's 73 KB of shared memory a program allows and int8's 106 KB at 7 stages not).
DECODE_CODE_PAIRS = False


@triton.jit
def _lane_starts(t, LANES: tl.constexpr, TILE_N: tl.constexpr):
    """The tile starts of a step at tile t: lane j takes tile t + j."""
    starts = ()
    for j in tl.static_range(LANES):
        starts = starts + ((t + j) * TILE_N,)
    return starts


@triton.jit
def _lane_blocks(table, t, end, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    """`tile_blocks` of each lane's tile of the step at tile t."""
    blocks = ()
    for j in tl.static_range(LANES):
        blocks = blocks + (tile_blocks(table, (t + j) * TILE_N, end, BLOCK_SIZE, TILE_N),)
    return blocks


@triton.jit
def _merge_lanes(acc, m, l, LANES: tl.constexpr):
    """Rows lane x ROWS -> ROWS: each lane's partial softmax (max m, sum l, acc) merged into
    its head's, as the split combine does. A lane that saw nothing has m -inf: weight 0."""
    ROWS: tl.constexpr = acc.shape[0] // LANES
    m2 = tl.reshape(m, [LANES, ROWS])
    m_all = tl.max(m2, axis=0)
    w = tl.exp2(m2 - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
    acc = tl.sum(tl.reshape(acc, [LANES, ROWS, acc.shape[1]]) * w[:, :, None], axis=0)
    return acc, m_all, tl.sum(tl.reshape(l, [LANES, ROWS]) * w, axis=0)


# Outside CUDA graphs num_splits and stride_table (the widest block table) change from step to
# step; specializing them on == 1 and multiples of 16 would compile more variants for scalars
# used once per program (SPLIT already tells the kernel whether it splits).
@triton.jit(do_not_specialize=["num_splits", "stride_table"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, k_res_ptr, v_res_ptr, res_tables_ptr, res_starts_ptr,
    sink_ptr, sink_scale_ptr, sink_zero_ptr,
    stride_m_block, stride_m_tok, stride_kc_block, stride_r_slot, stride_r_tok, stride_r_head, stride_res_table,
    num_kv_heads, scale_log2, num_splits, window, softcap,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head, stride_table,
    stride_c_block, stride_c_tok, stride_c_head,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_BITS: tl.constexpr, FP8: tl.constexpr, KIVI: tl.constexpr, CODE_MAGIC: tl.constexpr,
    CODE_BIAS: tl.constexpr, PLANES: tl.constexpr, UNPACK_ASM: tl.constexpr, SINK: tl.constexpr,
    LANES: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, CODES_F16: tl.constexpr,
    V_UNIT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    if KIVI:  # positions from here on are in the ring; loaded beside ctx, not after it
        res_start = tl.load(res_starts_ptr + seq)
    num_tiles = tl.cdiv(ctx, TILE_N)
    first_tile = 0
    if WINDOW:  # tiles wholly before the window are skipped, the rest split
        first_tile = tl.maximum(ctx - window, 0) // TILE_N
    per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_lo = first_tile + split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    # Rows: LANES lanes x ROWS (the group padded to a power of two); all lanes hold q.
    ROWS: tl.constexpr = BLOCK_H // LANES
    r = tl.arange(0, BLOCK_H)
    lane = r // ROWS
    head = kv_head * GROUP + r % ROWS
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_seq + head[:, None] * stride_q_head + d[None, :],
                mask=(r % ROWS < GROUP)[:, None], other=0.0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    last_pos = tl.zeros([BLOCK_H], tl.int32) + ctx - 1  # the query sits at the context's end
    if KV_BITS == 0:
        q = q.to(k_cache_ptr.dtype.element_ty)
        for t in range(tile_lo, tile_hi):
            acc, m, l = attend_tile(
                acc, m, l, q, last_pos, t * TILE_N, ctx, table, k_cache_ptr, v_cache_ptr, kv_head,
                stride_c_block, stride_c_tok, stride_c_head, scale_log2, window, softcap,
                HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION, WINDOW, SOFTCAP,
            )
    else:
        qs, q_sum = codes_query(q, PLANES, CODES_F16)
        coded_tiles = num_tiles
        coded_end = ctx
        if KIVI:
            coded_tiles = res_start // TILE_N
            coded_end = res_start
        # Lane j takes tiles t + j of each step; the split's last step may leave lanes
        # without a tile: their positions lie past `stop` and are masked.
        coded_hi = tl.minimum(tile_hi, coded_tiles)
        stop = tl.minimum(coded_hi * TILE_N, coded_end)
        accs = split_planes(acc, PLANES)
        u = tl.full([BLOCK_H], 1.0, tl.float32)
        # Block-table entries come two steps ahead of their use, scales one: the pipeliner
        # leaves such narrow gathers synchronous, and a step would wait for two round trips.
        blocks = _lane_blocks(table, tile_lo, stop, LANES, BLOCK_SIZE, TILE_N)
        scales = tile_scales(
            lane, blocks, _lane_starts(tile_lo, LANES, TILE_N), stop, k_scale_ptr, k_zero_ptr, v_scale_ptr,
            v_zero_ptr, kv_head, stride_m_block, stride_m_tok, stride_kc_block, HEAD_DIM, BLOCK_SIZE, TILE_N, FP8, KIVI,
        )
        blocks = _lane_blocks(table, tile_lo + LANES, stop, LANES, BLOCK_SIZE, TILE_N)
        for t in range(tile_lo, coded_hi, LANES):
            next_scales = tile_scales(
                lane, blocks, _lane_starts(t + LANES, LANES, TILE_N), stop, k_scale_ptr, k_zero_ptr,
                v_scale_ptr, v_zero_ptr, kv_head, stride_m_block, stride_m_tok, stride_kc_block,
                HEAD_DIM, BLOCK_SIZE, TILE_N, FP8, KIVI,
            )
            blocks = _lane_blocks(table, t + 2 * LANES, stop, LANES, BLOCK_SIZE, TILE_N)
            # fp8/int8: the last tile may be partial (CAUSAL masks it); KIVI tiles are whole.
            accs, m, l, u = attend_tile_quantized(
                accs, m, l, u, q, qs, q_sum, last_pos, lane, _lane_starts(t, LANES, TILE_N), stop, table,
                k_cache_ptr, v_cache_ptr, scales, kv_head, stride_c_block, stride_c_tok, stride_c_head, scale_log2,
                window, softcap, HEAD_DIM, BLOCK_SIZE, TILE_N, not KIVI, DOT_PRECISION, KV_BITS, FP8, KIVI,
                CODE_MAGIC, CODE_BIAS, UNPACK_ASM, SINK, WINDOW, SOFTCAP, V_UNIT,
            )
            scales = next_scales
        acc = join_units(accs, u, V_UNIT)
        if SINK:  # lane 0 of the split holding tile 0 takes position 0; after the loop, since
            # before it the loop ran 6% slower (int2, batch 32 x 8k, H100: 0.169 -> 0.160 ms)
            if (tile_lo == 0) & (coded_end > 0):
                rows = in_window(lane == 0, last_pos, window, WINDOW)
                acc, m, l = attend_sink(acc, m, l, q, rows, table, sink_ptr, sink_scale_ptr, sink_zero_ptr,
                                        kv_head, num_kv_heads, scale_log2, softcap, HEAD_DIM, SOFTCAP)
        if KIVI:
            # The ring rows as a block table of positions from the ring start on; lane 0's
            # rows alone attend them (the others' positions precede them).
            # A few tiles (the ring's blocks): unpipelined, their bf16 buffers (32 KB a stage)
            # would set the kernel's shared memory and cap the programs per SM.
            res_pos = tl.where(lane == 0, last_pos - res_start, -1)
            for t in tl.range(tl.maximum(tile_lo, coded_tiles), tile_hi, num_stages=1):
                acc, m, l = attend_tile(
                    acc, m, l, q, res_pos, t * TILE_N - res_start, ctx - res_start,
                    res_tables_ptr + seq * stride_res_table, k_res_ptr, v_res_ptr, kv_head,
                    stride_r_slot, stride_r_tok, stride_r_head, scale_log2, window, softcap,
                    HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION, WINDOW, SOFTCAP,
                )
    if LANES > 1:
        acc, m, l = _merge_lanes(acc, m, l, LANES)

    g = tl.arange(0, ROWS)
    head = kv_head * GROUP + g
    row_mask = (g < GROUP)[:, None]
    if SPLIT:
        # Unnormalized partials; an empty split leaves (-inf, 0, 0), which the combine ignores.
        part = (seq * NUM_HEADS + head) * num_splits + split
        tl.store(part_max_ptr + part, m, mask=g < GROUP)
        tl.store(part_sum_ptr + part, l, mask=g < GROUP)
        tl.store(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc, mask=row_mask)
    else:
        o = acc / tl.where(l > 0, l, 1.0)[:, None]  # context 0 (padding) gives 0, not NaN
        tl.store(out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_splits, stride_o_seq, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_SPLITS)
    part = (seq * NUM_HEADS + head) * num_splits + s
    m = tl.load(part_max_ptr + part, mask=s < num_splits, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=s < num_splits, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # 0 for empty splits
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                  mask=(s < num_splits)[:, None], other=0.0)
    total = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + d, o.to(out_ptr.dtype.element_ty))


def default_num_splits(num_seqs: int, num_kv_heads: int, max_tiles: int, device: torch.device,
                       quantized: bool = False) -> int:
    """Splits so that seqs x kv heads x splits gives about two programs per SM (one for a
    quantized cache), rounded up to a power of two (few compiled variants of the combine),
    and no more than the tiles of the longest possible context rounded up the same way. Two
    per SM measured best on an H100 for bf16 (Llama-3.1-8B shapes): batch 64 x 4k runs
    unsplit (splitting it in 2 cost 2%), batch 1 x 32k in 64 splits (128 cost 4%). A
    quantized program holds about 250 registers a thread, so two fill an SM (bf16's hold
    126: four fit), and splitting batch 32 x 8k in 2 cost 3% (fp8) to 7% (int4)."""
    # Off CUDA (the interpreter), an H100's 132 SMs: tests then exercise the GPU's choice.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = triton.cdiv((1 if quantized else 2) * sms, num_seqs * num_kv_heads)
    if want <= 1:
        return 1
    return min(triton.next_power_of_2(want), triton.next_power_of_2(max_tiles))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, **tunables,
) -> torch.Tensor:
    """`paged_decode_attention_cache` on a cache in the model dtype given as its two tensors
    [num_blocks, block_size, num_kv_heads, head_dim]."""
    return paged_decode_attention_cache(q, LayerKVCache(FORMATS["auto"], k_cache, v_cache), block_tables,
                                        context_lens, scale, **tunables)


def paged_decode_attention_cache(
    q: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
    scale: float, kivi: KiviPlan | None = None, sliding_window: int | None = None,
    softcap: float | None = None, *, tile_tokens: int | None = None, num_splits: int | None = None, num_warps: int = 4,
    num_stages: int | None = None, lanes: int | None = None, codes_f16: bool = True, code_pairs: bool | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; cache: one layer, any --kv-cache-dtype
    (kernels/kv_format.py); block_tables: [num_seqs, max_blocks] int32; context_lens:
    [num_seqs] int32 (device; never read on the host); kivi: the step's plan, for its ring
    tables and starts (int4/int2 caches only); sliding_window, softcap: as
    attention.paged_attention_ref. Returns [num_seqs, num_heads, head_dim].

    tile_tokens: tokens per K/V tile, a power of two, larger or smaller than block_size
    (64 x 128 dims x bf16: 16 KB of K and 16 KB of V per pipeline stage); with per-channel
    keys (int4/int2) at most block_size. num_splits: context splits per sequence; default from
    `default_num_splits`, with the block-table width as the bound on context length. lanes
    (quantized caches): tiles a program takes at once, one per lane of rows
    (`attend_tile_quantized`); at most the dots' 16 rows over the group size rounded up to a
    power of two. codes_f16: fp8/int8 codes of a bf16 model reach the dots as fp16
    (`code_dtype`), q rounded to fp16 (its range clamped). code_pairs: fp8/int8 codes read as
    int16 pairs (default `DECODE_CODE_PAIRS`). max_registers: a cap on the kernel's registers
    per thread (Triton's maxnreg), to fit more programs on an SM; None leaves it to ptxas.
    Defaults by format (`DEFAULTS`), from sweeps on an H100 at Llama-3.1-8B shapes, all 4
    warps: bf16 64 tokens, 3 stages (benchmarks/kernel_bench.py --sweep, 54 configurations:
    within 1% of the best at both batch 64 x 4k and batch 1 x 32k); the quantized formats the
    best of benchmarks/kv_quant_kernel_bench.py --sweep (batch 32 x 8k): fp8 128 tokens and 5
    stages, int8 128 and 7 (Triton keeps (num_stages - 1) // 2 tiles of codes in flight
    behind their block-table entries; with 3 a tile's codes are only requested once the
    previous tile is done), int4 64 tokens, 3 stages and 4 lanes (a step's 4 tiles of codes
    in flight are enough; 5 stages cost 3%), int2 64, 5 stages and 4 lanes.
    """
    num_seqs, num_heads, head_dim = q.shape
    pairs = DECODE_CODE_PAIRS if code_pairs is None else code_pairs
    k_cache, v_cache = kv_codes(cache, pairs)
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert num_heads == group * num_kv_heads and head_dim == triton.next_power_of_2(head_dim) >= 16
    assert k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    fmt = cache.fmt
    defaults = DEFAULTS[fmt.name]
    tile_tokens = tile_tokens or defaults[0]
    num_stages = num_stages or defaults[1]
    block_h = max(16, triton.next_power_of_2(group))
    lanes = (lanes or min(defaults[2], block_h // triton.next_power_of_2(group))) if fmt.quantized else 1
    assert block_h % (lanes * triton.next_power_of_2(group)) == 0
    if fmt.kivi:  # a tile must lie in one block: one key range per channel
        tile_tokens = min(tile_tokens, block_size)
        assert block_size % tile_tokens == 0
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_tiles = triton.cdiv(block_tables.shape[1] * block_size, tile_tokens)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_tiles, q.device, fmt.quantized)
    split = num_splits > 1
    part_shape = (num_seqs, num_heads, num_splits) if split else (0,)
    part_max = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((*part_shape, head_dim) if split else (0,), dtype=torch.float32, device=q.device)
    fmt_args, fmt_constexprs = cache_kernel_args(cache, q.dtype, kivi, codes_f16, pairs)
    dot_dtype = code_dtype(fmt, q.dtype, codes_f16) if fmt.quantized else k_cache.dtype
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_max, part_sum, *fmt_args,
        scale * LOG2E, num_splits, *variant_args(sliding_window, softcap),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_H=block_h, LANES=lanes,
        WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE_N=tile_tokens, SPLIT=split,
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", **fmt_constexprs,
        PDL=pdl_enabled(q.device), num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl_enabled(q.device),
        **({} if max_registers is None else {"maxnreg": max_registers}),
    )
    if split:
        _combine_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The reference, same arguments: `paged_attention_ref` on a batch of single-token queries."""
    n = q.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=q.device),
        block_tables=block_tables,
        context_lens=context_lens,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=q.device),
        query_lens=[1] * n,
        context_lens_host=context_lens.tolist(),
    )
    return paged_attention_ref(q, LayerKVCache(FORMATS["auto"], k_cache, v_cache), meta, scale)
