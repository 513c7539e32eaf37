"""The Triton kernels on quantized KV caches (fp8_e4m3, int8, int4, int2) against the references.

Write: codes and metadata equal write_kv_ref's. Attention: decode (split-K) and prefill over
a cache the reference wrote, against paged_attention_ref in float32 on the same cache, so
the kernels' own rounding is the only error measured. Caches are poisoned (random code
bytes, NaN scales and rings) wherever nothing was written: a read of such a slot shows.

Runs under Triton's interpreter on CPU tensors by default (small shapes: it is slow); with
TRITON_INTERPRET=0 and a GPU, on CUDA, bfloat16 included.
"""
import os
from dataclasses import fields

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import pytest
import torch
import triton
import triton.language as tl

from wattserve.engine.kivi_plan import kivi_plan
from wattserve.kernels.attention import AttentionMetadata, paged_attention_ref
from wattserve.kernels.kv_format import FORMATS, LayerKVCache, allocate_layer
from wattserve.kernels.kv_quant import unpack
from wattserve.kernels.kv_write import write_kv_ref
from wattserve.kernels.triton_attention import paged_attention_triton
from wattserve.kernels.triton_attention_decode import paged_decode_attention_cache
from wattserve.kernels.triton_attention_prefill import paged_prefill_attention_cache
from wattserve.kernels import triton_kv_write
from wattserve.kernels.triton_kv_write import write_kv_triton
from wattserve.kernels.triton_paged_tile import cache_kernel_args, join_planes, kv_codes, split_planes, unpack_planes

# Importing it applies its interpreter fix. Error bounds as there: the kernels' rounding of q,
# p (and q * scale, p * scale) to the model dtype is the error measured.
from test_triton_kernels import DEVICE, ON_GPU, assert_rel_close, rand

QUANTIZED = ["fp8_e4m3", "int8", "int4", "int2"]


# ---- building caches ---------------------------------------------------------------------------
def poisoned_layer(name, num_blocks, block_size, num_kv_heads, head_dim, dtype, num_slots, gen):
    """A cache whose every byte reads as garbage: random codes, NaN scales and rings."""
    cache = allocate_layer(FORMATS[name], num_blocks, block_size, num_kv_heads, head_dim, dtype,
                           torch.device(DEVICE), num_slots)
    for t in (cache.k, cache.v, cache.k_zero, cache.v_zero, cache.k_scale, cache.v_scale,
              cache.k_ring, cache.v_ring, cache.sink, cache.sink_scale, cache.sink_zero):
        if t is None:
            continue
        if t.dtype in (torch.uint8, torch.float8_e4m3fn):
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        else:
            t.fill_(float("nan"))
    return cache


def step_meta(computed, new, tables, rings, block_size, fmt, flush_padding=0, ring_from=None):
    """AttentionMetadata for a step writing new[i] tokens after computed[i] of sequence i (the
    engine's layout, engine/model_runner.py), with `flush_padding` extra flush rows of -1 as
    a CUDA-graph batch has; a KIVI plan for a KIVI `fmt`. ring_from[i]: the first position sequence i wrote to its
    ring (default 0; a prefix-cache hit's end)."""
    bs = block_size
    slots, starts = [], [0]
    for start, n, table in zip(computed, new, tables):
        slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        starts.append(starts[-1] + n)
    width = max(map(len, tables)) + 1  # a spare column: padding the kernels must not follow

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=DEVICE)

    plan = None
    if fmt.kivi:
        since = ring_from or [0] * len(computed)
        plan = kivi_plan(computed, new, tables, list(zip(rings, since)), bs, fmt.ring_blocks,
                         torch.device(DEVICE))
        plan.flush_blocks = torch.cat([plan.flush_blocks, t([-1] * flush_padding)])
        for name in ("flush_ring", "flush_prior", "flush_start"):
            setattr(plan, name, torch.cat([getattr(plan, name), t([0] * flush_padding)]))
    ctx = [c + n for c, n in zip(computed, new)]
    return AttentionMetadata(
        slot_mapping=t(slots), block_tables=t([tb + [0] * (width - len(tb)) for tb in tables], torch.int32),
        context_lens=t(ctx, torch.int32), query_start_loc=t(starts, torch.int32),
        query_lens=list(new), context_lens_host=ctx, kivi=plan,
    )


def rings_of(meta, fmt) -> list[int]:
    """Each sequence's ring, from its plan's ring rows."""
    return (meta.kivi.ring_tables[:, 0] // fmt.ring_blocks).tolist() if fmt.kivi else [0] * len(
        meta.query_lens)


def quantized_batch(name, query_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size,
                    seed=0):
    """(q, cache, meta): each sequence's cached prefix, then its query tokens, written by
    write_kv_ref as two engine steps; blocks scattered over the pool (block 0, which padded
    table entries point at, never used); ring shuffled."""
    gen = torch.Generator().manual_seed(seed)
    fmt = FORMATS[name]
    n = len(context_lens)
    blocks_needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_needed) + 3
    cache = poisoned_layer(name, num_blocks, block_size, num_kv_heads, head_dim, dtype, n + 2, gen)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = [[free.pop() for _ in range(nb)] for nb in blocks_needed]
    rings = torch.randperm(n + 2, generator=gen)[:n].tolist()
    prefix = [c - q for c, q in zip(context_lens, query_lens)]
    # Odd sequences read their prefix's full blocks as a prefix-cache hit would: quantized.
    hits = [p // block_size * block_size if i % 2 else 0 for i, p in enumerate(prefix)]
    for computed, new, since in (([0] * n, prefix, None), (prefix, list(query_lens), hits)):
        meta = step_meta(computed, new, tables, rings, block_size, fmt, ring_from=since)
        total = sum(new)
        k, v = rand(total, num_kv_heads, head_dim, dtype=dtype, gen=gen), rand(total, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        k[..., 3] += 4.0  # an outlier channel, as real keys have
        write_kv_ref(k, v, cache, meta)
    q = rand(sum(query_lens), num_heads, head_dim, dtype=dtype, gen=gen)
    return q, cache, meta


def reference(q, cache, meta, scale):
    """paged_attention_ref in float32 (it dequantizes into q's dtype)."""
    return paged_attention_ref(q.float(), cache, meta, scale)


def cache_tensors(cache: LayerKVCache) -> list:
    return [getattr(cache, f.name) for f in fields(cache) if f.name != "fmt"]


def clone_cache(cache: LayerKVCache) -> LayerKVCache:
    return LayerKVCache(cache.fmt, *(None if t is None else t.clone() for t in cache_tensors(cache)))


# ---- KV write ----------------------------------------------------------------------------------
def assert_same_cache(got: LayerKVCache, want: LayerKVCache):
    """Codes: at least 99.9% equal, all within 1 (a rounding tie may land either way); scales
    and zeros equal; written ring rows equal. Compared byte-wise: NaN poison included."""
    fmt = got.fmt
    pairs = list(zip(got.block_tensors(), want.block_tensors()))
    if fmt.kivi:
        pairs += [(got.k_ring, want.k_ring), (got.v_ring, want.v_ring)]
    for i, (a, b) in enumerate(pairs):
        if i < 2 and not fmt.fp8:  # packed integer codes: compare the codes
            ca, cb = unpack(a, fmt.bits), unpack(b, fmt.bits)
            assert (ca - cb).abs().max() <= 1
            assert (ca == cb).float().mean() >= 0.999
        else:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"tensor {i} differs"


@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_per_token_formats_match_ref_and_skip_negative_slots(name, dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_blocks, block_size, num_kv_heads, head_dim = 21, 6, 16, 3, 64
    # k and v as strided views of one fused projection, as the model passes them.
    kv = rand(num_tokens, 3, num_kv_heads, head_dim, dtype=dtype, gen=gen) * 3
    kv[4, 0, 1] = 0.0  # a zero row: scale 1, codes at the zero point
    k, v = kv[:, 0], kv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[5] = -1
    meta = AttentionMetadata(slots.to(DEVICE), None, None, None, [], [])
    want = poisoned_layer(name, num_blocks, block_size, num_kv_heads, head_dim, dtype, 0, gen)
    got = clone_cache(want)
    write_kv_ref(k, v, want, meta)
    write_kv_triton(k, v, got, meta)
    assert_same_cache(got, want)  # the skipped token's slot kept its poison too


@triton.jit
def _fp8_adds_kernel(y_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, triton_kv_write._fp8_values_by_adds(tl.load(y_ptr + i)))


def test_fp8_rounding_by_float_adds_is_the_conversions():
    """Every e4m3 value, the midpoints between neighbours (ties to even), a hair either side
    of them, subnormals, values past 448 and random ones round as torch's conversion does."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    y = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), torch.tensor([449.0, -500.0, 1e-9]),
                   torch.randn(1000, generator=torch.Generator().manual_seed(11)) * 50])
    y = torch.cat([y, torch.zeros(4096 - len(y))])
    out = torch.empty(4096, device=DEVICE)
    _fp8_adds_kernel[(1,)](y.to(DEVICE), out, N=4096)
    assert torch.equal(out.cpu(), y.clamp(-448, 448).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("near_tie,by_adds", [(0.0, False), (0.0, True), (1e30, False)],
                         ids=["screened", "screened-by-adds", "exact"])
def test_fp8_scale_search_screened_or_exact_matches_ref(near_tie, by_adds, monkeypatch):
    """The float32 screening alone (no near tie resolved; its rounding by conversion or by
    float adds) and the exact search for every row pick the reference's scales, on rows of
    every magnitude: a zero row, ranges that round into fp16's subnormals (|x / scale| past
    448 before the clamp), large values."""
    monkeypatch.setattr(triton_kv_write, "FP8_NEAR_TIE", near_tie)
    monkeypatch.setattr(triton_kv_write, "FP8_SCREEN_BY_ADDS", by_adds)
    gen = torch.Generator().manual_seed(8)
    num_tokens, num_kv_heads, head_dim = 32, 2, 64
    magnitude = 10.0 ** torch.randint(-6, 3, (num_tokens, 1, 1), generator=gen)
    k = rand(num_tokens, num_kv_heads, head_dim, gen=gen) * magnitude.to(DEVICE)
    v = rand(num_tokens, num_kv_heads, head_dim, gen=gen)
    k[0] = 0.0
    meta = AttentionMetadata(torch.randperm(num_tokens, generator=gen).to(DEVICE), None, None, None, [], [])
    want = poisoned_layer("fp8_e4m3", num_tokens // 16, 16, num_kv_heads, head_dim, torch.float32, 0, gen)
    got = clone_cache(want)
    write_kv_ref(k, v, want, meta)
    write_kv_triton(k, v, got, meta)
    assert_same_cache(got, want)


@pytest.mark.parametrize("name,block_size,dtype", [("int4", 16, torch.float32), ("int2", 64, torch.bfloat16),
                                                   ("int4", 64, torch.float16)])
def test_write_kivi_flushes_full_blocks_and_fills_rings(name, block_size, dtype):
    gen = torch.Generator().manual_seed(1)
    bs, num_kv_heads, head_dim = block_size, 2, 64
    # Sequence 0: `prior` tokens already in its residual, this step fills that block and the
    # next and leaves 3 in the ring; 1: a decode that fills a block; 2: a decode that does
    # not; plus a padding flush row (-1).
    computed = [5, bs - 1, 2 * bs + 2]
    new = [2 * bs - 5 + 3, 1, 1]
    tables = [[1, 7, 3], [5], [4, 8, 6]]
    rings = [3, 1, 4]
    cache = poisoned_layer(name, 9, bs, num_kv_heads, head_dim, dtype, 5, gen)
    # Earlier steps' tokens in the ring (a flushed block reads them).
    ring = cache.fmt.ring_blocks
    for seq, c in enumerate(computed):
        row, keep = rings[seq] * ring + c // bs % ring, c % bs
        cache.k_ring[row, :keep] = rand(keep, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        cache.v_ring[row, :keep] = rand(keep, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    meta = step_meta(computed, new, tables, rings, bs, cache.fmt, flush_padding=1)
    assert meta.kivi.flush_prior.tolist() == [5, 0, bs - 1, 0]
    fused = rand(sum(new), 2, num_kv_heads, head_dim, dtype=dtype, gen=gen) * 2
    fused[..., 0, :, 3] += 6.0
    k, v = fused[:, 0], fused[:, 1]
    got = clone_cache(cache)
    write_kv_ref(k, v, cache, meta)
    write_kv_triton(k, v, got, meta)
    assert_same_cache(got, cache)


# ---- attention ---------------------------------------------------------------------------------
DECODE_CONTEXTS = [1, 15, 17, 64, 100, 130]


# None: the default splits, many for so few programs (an H100's 132 SMs), some empty; the
# default lanes (4 for int4/int2 with groups of 3 and 4 heads, else 1). 32-token tiles span
# blocks of 16 (per token block-table entries) and lie in blocks of 64.
@pytest.mark.parametrize("name,num_heads,num_kv_heads,head_dim,block_size,dtype,num_splits,lanes", [
    ("fp8_e4m3", 8, 2, 64, 16, torch.float16, None, None),
    ("fp8_e4m3", 8, 2, 64, 16, torch.float16, 3, 4),
    ("int8", 9, 3, 128, 16, torch.float32, 1, None),
    ("int8", 8, 2, 64, 16, torch.float16, 3, 2),
    ("int4", 8, 2, 128, 64, torch.float16, 2, None),
    ("int4", 8, 2, 128, 64, torch.float16, 1, 1),
    ("int4", 9, 3, 64, 16, torch.float32, 3, 2),
    ("int2", 8, 2, 64, 64, torch.float32, None, None),
    ("int2", 9, 3, 128, 16, torch.float16, 4, None),
])
def test_decode_split_k(name, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits, lanes):
    q, cache, meta = quantized_batch(name, [1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, num_heads, num_kv_heads,
                                     head_dim, dtype, block_size, seed=2)
    scale = head_dim**-0.5
    out = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale, meta.kivi,
                                       tile_tokens=32, num_splits=num_splits, lanes=lanes)
    assert_rel_close(out, reference(q, cache, meta, scale), dtype)


MIXED_QUERY_LENS = [1, 17, 5, 16, 1, 40]
MIXED_CONTEXTS = [33, 17, 40, 80, 1, 150]  # decodes, whole prompts, chunks over a cached prefix


# block_n 16 < block_size 64: ring tiles before a query tile's first position (no mask).
@pytest.mark.parametrize("name,num_heads,num_kv_heads,head_dim,block_size,dtype,block_n", [
    ("fp8_e4m3", 9, 3, 128, 16, torch.float32, None),
    ("int8", 8, 2, 64, 16, torch.float16, None),
    ("int4", 8, 2, 64, 16, torch.float16, None),
    ("int2", 9, 3, 64, 64, torch.float16, 16),
    ("int2", 8, 2, 128, 16, torch.float32, None),
])
def test_prefill_mixed_batch(name, num_heads, num_kv_heads, head_dim, block_size, dtype, block_n):
    q, cache, meta = quantized_batch(name, MIXED_QUERY_LENS, MIXED_CONTEXTS, num_heads, num_kv_heads, head_dim,
                                     dtype, block_size, seed=3)
    scale = head_dim**-0.5
    if block_n is None:  # through the entry point
        out = paged_attention_triton(q, cache, meta, scale)
    else:
        out = paged_prefill_attention_cache(q, cache, meta, scale, block_n=block_n)
    assert_rel_close(out, reference(q, cache, meta, scale), dtype)


# Gemma's variants: a window of 24 (shorter than most contexts: decode skips the tiles before
# it, int2's sink position 0 falls outside it for some rows and inside for others) and a cap
# of 2 on scores of about unit size (every score bent).
@pytest.mark.parametrize("name,block_size,dtype", [
    ("auto", 16, torch.float32), ("fp8_e4m3", 16, torch.float16), ("int8", 16, torch.float32),
    ("int4", 64, torch.float16), ("int2", 16, torch.float32),
])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_sliding_window_and_softcap(name, block_size, dtype, decode, window=24, softcap=2.0):
    query_lens = [1] * len(DECODE_CONTEXTS) if decode else MIXED_QUERY_LENS
    contexts = DECODE_CONTEXTS if decode else MIXED_CONTEXTS
    q, cache, meta = quantized_batch(name, query_lens, contexts, 8, 2, 64, dtype, block_size, seed=5)
    out = paged_attention_triton(q, cache, meta, 0.125, sliding_window=window, softcap=softcap)
    want = paged_attention_ref(q.float(), cache, meta, 0.125, sliding_window=window, softcap=softcap)
    assert_rel_close(out, want, dtype)


@pytest.mark.parametrize("name", QUANTIZED)
def test_decode_entry_point_and_write_kernel_together(name):
    """A decode step as the model runs it: the write kernel stores the new token (flushing a
    block for the int4/int2 sequence whose block fills), then attention reads it back."""
    gen = torch.Generator().manual_seed(4)
    bs = 16
    q, cache, meta = quantized_batch(name, [1, 1, 1], [bs - 1, 40, 2 * bs - 1], 8, 2, 64, torch.float16, bs, seed=4)
    # No context is a multiple of bs: each new token lands in its sequence's last block.
    tables = [row[: -(-c // bs)] for row, c in zip(meta.block_tables.tolist(), meta.context_lens_host)]
    step = step_meta(meta.context_lens_host, [1, 1, 1], tables, rings_of(meta, cache.fmt), bs,
                     cache.fmt)
    k, v = rand(3, 2, 64, dtype=torch.float16, gen=gen), rand(3, 2, 64, dtype=torch.float16, gen=gen)
    want = clone_cache(cache)
    write_kv_ref(k, v, want, step)
    write_kv_triton(k, v, cache, step)
    assert_same_cache(cache, want)
    q = rand(3, 8, 64, dtype=torch.float16, gen=gen)
    assert_rel_close(paged_attention_triton(q, cache, step, 0.125), reference(q, want, step, 0.125), torch.float16)


@triton.jit
def _planes_kernel(w_ptr, out_ptr, resplit_ptr, N: tl.constexpr, WORDS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   KV_BITS: tl.constexpr, CODE_MAGIC: tl.constexpr, PLANES: tl.constexpr, UNPACK_ASM: tl.constexpr):
    """out: the code words' planes joined into channel order; resplit: split_planes of that, plane by plane."""
    n = tl.arange(0, N)[:, None]
    w = tl.load(w_ptr + n * WORDS + tl.arange(0, WORDS)[None, :])
    planes = unpack_planes(w, out_ptr.dtype.element_ty, PLANES, KV_BITS, False, CODE_MAGIC, UNPACK_ASM)
    x = join_planes(planes)
    tl.store(out_ptr + n * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], x)
    resplit = split_planes(x, PLANES)
    for i in tl.static_range(PLANES):
        tl.store(resplit_ptr + (i * N + n) * WORDS + tl.arange(0, WORDS)[None, :], resplit[i])


@pytest.mark.parametrize("bits,head_dim", [(2, 64), (4, 64), (4, 32), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_planes_give_bias_plus_code_in_the_dot_dtype(bits, head_dim, dtype):
    """The bit trick that makes codes floats without a conversion (bfloat16 included, whose
    dot the interpreter cannot run; on a GPU, through the kernels' inline PTX): each code
    plus CODE_BIAS; plane i of the code words holds the channels that plane i of
    split_planes does (q's, against K), and join_planes puts them back in pack's channel
    order (the accumulators, from V). int4 at head_dim 32 reads bytes (2 planes), at 64
    int16 words (4 planes)."""
    if dtype == torch.bfloat16 and bits == 8 and not ON_GPU:  # no bias trick there: a conversion
        pytest.skip("the interpreter casts integers to bfloat16 as raw bits")
    codes = torch.randint(0, 1 << bits, (16, head_dim), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    packed = codes.view(16, head_dim * bits // 8, 8 // bits).to(torch.int32) << (torch.arange(8 // bits) * bits)
    packed = packed.sum(-1).to(torch.uint8).to(DEVICE)
    cache = allocate_layer(FORMATS[{2: "int2", 4: "int4", 8: "int8"}[bits]], 1, 16, 1, head_dim, dtype,
                           torch.device(DEVICE), 1)
    cache.k.view(-1).copy_(packed.view(-1))
    words = kv_codes(cache)[0].view(16, -1)
    plan = step_meta([0], [1], [[0]], [0], 16, cache.fmt).kivi
    constexprs = cache_kernel_args(cache, dtype, plan)[1]
    planes = constexprs["PLANES"]
    out = torch.empty(16, head_dim, dtype=dtype, device=DEVICE)
    resplit = torch.empty(planes, 16, words.shape[1], dtype=dtype, device=DEVICE)
    _planes_kernel[(1,)](words, out, resplit, 16, words.shape[1], head_dim, bits, constexprs["CODE_MAGIC"], planes,
                         constexprs["UNPACK_ASM"])
    want = codes.float() + constexprs["CODE_BIAS"]
    assert torch.equal(out.float().cpu(), want)
    assert torch.equal(resplit.float().cpu(), want.view(16, -1, planes).permute(2, 0, 1))


@pytest.mark.parametrize("name,head_dim", [("int2", 32), ("int4", 16)])
def test_planes_narrower_than_a_dot_are_refused(name, head_dim):
    cache = allocate_layer(FORMATS[name], 1, 16, 1, head_dim, torch.float16, torch.device("meta"), 1)
    with pytest.raises(ValueError, match=f"head_dim >= {2 * head_dim}"):
        cache_kernel_args(cache, torch.float16, None)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", QUANTIZED)
def test_write_and_decode_in_a_cuda_graph(name):
    """The write (flushing a block, padded flush rows) and attention captured in one graph:
    both read their lengths and plans on the device only."""
    bs = 64 if FORMATS[name].kivi else 16
    q, cache, meta = quantized_batch(name, [1, 1], [200, 64], 8, 2, 128, torch.bfloat16, bs, seed=6)
    gen = torch.Generator().manual_seed(6)
    tables = [row[: -(-c // bs)] for row, c in zip(meta.block_tables.tolist(), meta.context_lens_host)]
    # Rewrites each sequence's last token: sequence 1's fills its block (int4/int2: a flush).
    step = step_meta([199, 63], [1, 1], tables, rings_of(meta, cache.fmt), bs, cache.fmt,
                     flush_padding=2)
    k, v = rand(2, 2, 128, dtype=torch.bfloat16, gen=gen), rand(2, 2, 128, dtype=torch.bfloat16, gen=gen)
    want = clone_cache(cache)

    def run():
        write_kv_triton(k, v, cache, step)
        return paged_attention_triton(q, cache, step, 128**-0.5)

    run()  # compile outside the capture, then start again from the same cache
    for t, w in zip(cache_tensors(cache), cache_tensors(want)):
        if t is not None:
            t.copy_(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    write_kv_ref(k, v, want, step)
    assert_same_cache(cache, want)
    assert_rel_close(out, reference(q, want, step, 128**-0.5), torch.bfloat16)


@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("codes_f16", [True, pytest.param(False, marks=pytest.mark.skipif(
    not ON_GPU, reason="the interpreter cannot run a bfloat16 dot"))])
def test_bf16_model_with_8bit_codes_in_fp16_dots_or_bf16(name, codes_f16):
    """A bf16 model's fp8/int8 codes go to the dots as fp16 (q rounded to fp16: the dots are
    fp16, which the interpreter runs too) or as bf16: both within bf16's bound of the
    reference, decode and prefill."""
    scale = 128**-0.5
    q, cache, meta = quantized_batch(name, [1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, 8, 2, 128, torch.bfloat16,
                                     16, seed=9)
    out = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale, codes_f16=codes_f16)
    assert_rel_close(out, reference(q, cache, meta, scale), torch.bfloat16)
    q, cache, meta = quantized_batch(name, MIXED_QUERY_LENS, MIXED_CONTEXTS, 8, 2, 128, torch.bfloat16, 16, seed=9)
    out = paged_prefill_attention_cache(q, cache, meta, scale, codes_f16=codes_f16)
    assert_rel_close(out, reference(q, cache, meta, scale), torch.bfloat16)


@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])  # KIVI formats run the same tile code
def test_fp16_dots_keep_small_values_out_of_fp16_subnormals(name):
    """V scaled by 1e-4 (p * scale then lies under fp16's smallest normal, 6e-5, for every p):
    the per-row unit keeps fp16's precision, prefill and decode (with lanes). Without it the
    errors were 6.7e-2 (fp8) and 2.8e-2 (int8)."""
    q, cache, meta = quantized_batch(name, MIXED_QUERY_LENS, MIXED_CONTEXTS, 8, 2, 64, torch.float16, 16, seed=10)
    written = torch.isfinite(cache.v_scale)  # the poison (NaN) stays
    cache.v_scale[written] = (cache.v_scale[written].float() * 1e-4).half()
    assert_rel_close(paged_attention_triton(q, cache, meta, 0.125), reference(q, cache, meta, 0.125), torch.float16)
    q, cache, meta = quantized_batch(name, [1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, 8, 2, 64, torch.float16, 16,
                                     seed=10)
    written = torch.isfinite(cache.v_scale)
    cache.v_scale[written] = (cache.v_scale[written].float() * 1e-4).half()
    out = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, 0.125, lanes=4)
    assert_rel_close(out, reference(q, cache, meta, 0.125), torch.float16)


# ---- fp8/int8 codes read as int16 pairs (triton_attention_decode.DECODE_CODE_PAIRS) ------------
# Odd contexts and partial last blocks (DECODE_CONTEXTS); tiles of 32 span blocks of 16, a tile
# of 16 lies in one; head_dim 32 gives the narrowest planes a dot takes (16 channels).
@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("head_dim,dtype,tile_tokens,num_splits,lanes", [
    (64, torch.float16, 32, None, None),
    (128, torch.bfloat16, 16, 1, None),
    (32, torch.float16, 32, 3, 4),
    (64, torch.float32, 32, 2, 2),
], ids=["d64-fp16", "d128-bf16-tile16", "d32-fp16-lanes4", "d64-fp32-lanes2"])
def test_decode_code_pairs(name, head_dim, dtype, tile_tokens, num_splits, lanes):
    """Decode over codes read as int16 pairs, against the reference within the bound of the
    byte reading (a bf16 model's codes reach the dots as fp16, which the interpreter runs)."""
    q, cache, meta = quantized_batch(name, [1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, 8, 2, head_dim, dtype, 16,
                                     seed=11)
    scale = head_dim**-0.5
    out = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale, tile_tokens=tile_tokens,
                                       num_splits=num_splits, lanes=lanes, code_pairs=True)
    assert_rel_close(out, reference(q, cache, meta, scale), dtype)


@triton.jit
def _pair_planes_kernel(w_ptr, out_ptr, N: tl.constexpr, WORDS: tl.constexpr, FP8: tl.constexpr,
                        CODE_MAGIC: tl.constexpr, UNPACK_ASM: tl.constexpr):
    """out [2, N, WORDS]: the two planes of int16 code words [N, WORDS] (bytes 0 and 1 of each)."""
    n = tl.arange(0, N)[:, None]
    w = tl.load(w_ptr + n * WORDS + tl.arange(0, WORDS)[None, :])
    planes = unpack_planes(w, out_ptr.dtype.element_ty, 2, 8, FP8, CODE_MAGIC, UNPACK_ASM)
    for i in tl.static_range(2):
        tl.store(out_ptr + (i * N + n) * WORDS + tl.arange(0, WORDS)[None, :], planes[i])


def pair_planes(name, dtype, asm):
    """Every int16 word (all 65536) through `unpack_planes` as the decode kernel takes pairs
    of `name`'s codes for dots in `dtype` (`cache_kernel_args`); asm: with its inline PTX
    (a GPU only) or its plain Triton twin. Returns (words [256, 256], planes [2, 256, 256])."""
    words = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(256, 256).to(DEVICE)
    cache = allocate_layer(FORMATS[name], 1, 16, 1, 64, dtype, torch.device(DEVICE), 1)
    constexprs = cache_kernel_args(cache, dtype, None, True, pairs=True, native=asm)[1]
    assert constexprs["PLANES"] == 2 and (len(constexprs["UNPACK_ASM"]) == 2) == asm
    out = torch.empty(2, 256, 256, dtype=torch.float16, device=DEVICE)
    _pair_planes_kernel[(1,)](words, out, 256, 256, FORMATS[name].fp8, constexprs["CODE_MAGIC"],
                              constexprs["UNPACK_ASM"])
    return words, out


@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
def test_pair_planes_are_torch_conversions_bit_for_bit(name):
    """Plane i of an int16 word is its byte i: fp8, the e4m3 value in fp16 (torch's
    conversion, exact); int8, 1024 + code in fp16 (CODE_BIAS). All 65536 words, bit for bit
    but for fp8's NaN codes 0x7f and 0xff (never written: the write clamps to 448), which
    stay NaN on a GPU and which the interpreter's cast reads as +-480. Under the interpreter
    the plain Triton twin, on a GPU the inline PTX."""
    words, got = pair_planes(name, torch.float16, ON_GPU)
    data = words.cpu().view(torch.uint8).view(256, 256, 2).permute(2, 0, 1)  # little-endian: byte 0 low
    if name == "int8":
        want = data.float().add(1024.0).half()
    else:
        want = data.contiguous().view(torch.float8_e4m3fn).half()
    got = got.cpu()
    nan = want.isnan()
    assert nan.sum() == (2 * 2 * 256 * 256 // 256 if name == "fp8_e4m3" else 0)  # 2 of 256 bytes, 2 planes
    if ON_GPU:
        assert got[nan].isnan().all()
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.skipif(not ON_GPU, reason="inline PTX runs on a GPU only")
@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
def test_pair_planes_asm_is_its_twin_bit_for_bit(name):
    """The inline PTX (prmt; fp8 also cvt.rn.f16x2.e4m3x2) against the plain Triton twin the
    interpreter tests run, compiled, on every int16 word: bit for bit, NaN for NaN."""
    _, asm = pair_planes(name, torch.float16, True)
    _, twin = pair_planes(name, torch.float16, False)
    nan = twin.isnan()
    assert torch.equal(asm.isnan(), nan)
    assert torch.equal(asm.view(torch.int16)[~nan], twin.view(torch.int16)[~nan])


@pytest.mark.skipif(not ON_GPU, reason="inline PTX runs on a GPU only")
@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
def test_decode_code_pairs_at_llama_shapes(name):
    """Llama-3.1-8B's heads, batch 32 x 200-263 tokens, a bf16 model: the pairs reading
    (inline PTX), also capped at 168 registers (`max_registers`), and the byte reading, each
    within bf16's bound of the reference."""
    contexts = [200 + 37 * i % 64 for i in range(32)]
    q, cache, meta = quantized_batch(name, [1] * 32, contexts, 32, 8, 128, torch.bfloat16, 16, seed=12)
    scale = 128**-0.5
    ref = reference(q, cache, meta, scale)
    pairs = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale, code_pairs=True)
    pairs_capped = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale,
                                                code_pairs=True, max_registers=168)
    bytes_ = paged_decode_attention_cache(q, cache, meta.block_tables, meta.context_lens, scale, code_pairs=False)
    for out in (pairs, pairs_capped, bytes_):
        assert_rel_close(out, ref, torch.bfloat16)
