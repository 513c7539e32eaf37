"""The Triton kernels against their PyTorch references.

Runs under Triton's interpreter on CPU tensors by default. With TRITON_INTERPRET=0 and a GPU
the same tests run the compiled kernels on CUDA, bfloat16 attention included (the interpreter
cannot run a bfloat16 tl.dot: it multiplies the raw bit patterns).
"""
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import pytest
import torch

from wattserve.kernels.activation import gelu_tanh_and_mul_ref, silu_and_mul_ref
from wattserve.kernels.attention import AttentionMetadata, paged_attention_ref
from wattserve.kernels.cudnn_prefill import fresh_prefill_cudnn, fresh_prefill_fits
from wattserve.kernels.dispatch import REFERENCE_OPS, ops_for
from wattserve.kernels.kv_format import FORMATS, LayerKVCache, allocate_layer
from wattserve.kernels.kv_write import write_kv_ref
from wattserve.kernels.norm import add_rms_norm_ref, rms_norm_ref
from wattserve.kernels.rotary import HeadNorm, apply_rotary_ref, rope_cos_sin, rotary_write_kv_ref
from wattserve.kernels.triton_activation import gelu_tanh_and_mul_triton, silu_and_mul_triton
from wattserve.kernels.triton_attention import paged_attention_triton
from wattserve.kernels.triton_attention_decode import paged_decode_attention, paged_decode_attention_ref
from wattserve.kernels.triton_attention_prefill import paged_prefill_attention
from wattserve.kernels.triton_gemv import gemv_triton, linear_triton, split_k
from wattserve.kernels.triton_interpreter import fix_loop_bounds
from wattserve.kernels.triton_kv_write import write_kv_triton
from wattserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from wattserve.kernels.triton_rotary import apply_rotary_triton, rotary_write_kv_triton

AUTO = FORMATS["auto"]

ON_GPU = os.environ["TRITON_INTERPRET"] != "1"


if not ON_GPU:
    fix_loop_bounds()
DEVICE = "cuda" if ON_GPU else "cpu"
ELEMENTWISE_DTYPES = [torch.float32, torch.bfloat16]
ATTENTION_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Elementwise ops round like their references; a last-bit flip in an intermediate (the
# statistics' summation order differs) still moves a bfloat16 output by a few units.
ELEMENTWISE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# ||out - ref|| / ||ref|| bounds: fp32 (exact or tf32-free dots), then half-precision operands.
REL_ERR = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def rand(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def assert_rel_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or read past the context)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < REL_ERR[dtype], f"relative error {err:.2e}"


# ---- KV write ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 128)])
def test_write_kv_matches_ref_and_skips_negative_slots(dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_blocks, block_size = 21, 6, 16
    # k and v as strided views of one fused projection, as the model passes them.
    kv = rand(num_tokens, 3, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    k, v = kv[:, 0], kv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[5] = -1
    cache = rand(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    want = cache.clone()
    write_kv_ref(k, v, LayerKVCache(AUTO, want[0], want[1]), SimpleNamespace(slot_mapping=slots.to(DEVICE)))
    write_kv_triton(k, v, LayerKVCache(AUTO, cache[0], cache[1]), SimpleNamespace(slot_mapping=slots.to(DEVICE)))
    assert torch.equal(cache, want)  # the skipped token's slot kept its old contents too


# ---- norms, rotary, SwiGLU ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("hidden", [100, 256])
def test_rms_norm(dtype, hidden):
    gen = torch.Generator().manual_seed(1)
    x, w = rand(7, hidden, dtype=dtype, gen=gen), rand(hidden, dtype=dtype, gen=gen)
    out = rms_norm_triton(x, w, 1e-5)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), **ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("hidden", [100, 256])
def test_add_rms_norm_in_place(dtype, hidden):
    gen = torch.Generator().manual_seed(2)
    x, res, w = rand(7, hidden, dtype=dtype, gen=gen), rand(7, hidden, dtype=dtype, gen=gen), rand(hidden, dtype=dtype, gen=gen)
    want_out, want_res = add_rms_norm_ref(x, res, w, 1e-5)
    out, new_res = add_rms_norm_triton(x, res, w, 1e-5)
    assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr()  # documented
    torch.testing.assert_close(out, want_out, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(new_res, want_res, **ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 1, 128)])
def test_rotary_in_place_on_views(dtype, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(3)
    n, table = 11, rope_cos_sin(head_dim, 10000.0, None, 300).to(DEVICE)
    qkv = rand(n, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : num_heads * head_dim].view(n, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(n, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.randint(0, 300, (n,), generator=gen).to(DEVICE)
    want_q, want_k = apply_rotary_ref(q, k, positions, table)
    out_q, out_k = apply_rotary_triton(q, k, positions, table)
    assert out_q.data_ptr() == q.data_ptr()
    torch.testing.assert_close(out_q, want_q, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(out_k, want_k, **ELEMENTWISE_TOL[dtype])
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("normed", [False, True])
def test_rotary_write_kv_fused(dtype, kv_dtype, normed):
    """The fused kernel (unquantized cache) and the rotate-then-quantize path (int8) leave
    the same q and cache as the reference, with or without Qwen3's per-head q/k norms;
    skipped slots (-1) keep their old contents."""
    if kv_dtype == "int8" and dtype == torch.float32:
        pytest.skip("a quantized cache holds a half-precision model's K/V")
    gen = torch.Generator().manual_seed(5)
    n, num_heads, num_kv_heads, head_dim, num_blocks, block_size = 13, 6, 2, 64, 4, 16
    table = rope_cos_sin(head_dim, 500000.0, None, 300).to(DEVICE)
    # Projections far from unit scale, so that a missing or misplaced norm shows.
    qkv = 7 * rand(n, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, gen=gen)
    head_norm = HeadNorm(1 + rand(head_dim, dtype=dtype, gen=gen) / 4, 1 + rand(head_dim, dtype=dtype, gen=gen) / 4,
                         1e-6) if normed else None
    split = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(n, -1, head_dim) for t in split)
    positions = torch.randint(0, 300, (n,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[4] = -1
    meta = SimpleNamespace(slot_mapping=slots.to(DEVICE))
    caches = [_poisoned_cache(FORMATS[kv_dtype], num_blocks, block_size, num_kv_heads, head_dim, dtype)
              for _ in range(2)]  # the same poison on both sides
    want_q = rotary_write_kv_ref(q.clone(), k.clone(), v.clone(), positions, table, caches[0], meta, head_norm)
    out_q = rotary_write_kv_triton(q, k, v, positions, table, caches[1], meta, head_norm)
    assert out_q.data_ptr() == q.data_ptr()
    torch.testing.assert_close(out_q, want_q, **ELEMENTWISE_TOL[dtype])
    # A rotated key that rounds differently in its last bit moves its token's range: int8
    # codes may then differ by a step or two.
    tol = dict(atol=2, rtol=0.02) if kv_dtype == "int8" else ELEMENTWISE_TOL[dtype]
    for want, got in zip(caches[0].block_tensors(), caches[1].block_tensors()):
        torch.testing.assert_close(got.float(), want.float(), **tol)


def _poisoned_cache(fmt, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    cache = allocate_layer(fmt, num_blocks, block_size, num_kv_heads, head_dim, dtype, DEVICE)
    gen = torch.Generator().manual_seed(6)
    for t in cache.block_tensors():
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        else:
            t.copy_(torch.randn(t.shape, generator=gen))
    return cache


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n, k, bias", [(48, 512, False), (40, 300, True), (16, 1024, False), (24, 2800, True)])
def test_gemv_matches_linear(rows, n, k, bias):
    """Odd column counts (a partial last program), K not a multiple of the tile, and K split
    over 2 to 10 programs of a column tile (few tiles: split_k), each config called twice (the
    split counters must be back at zero)."""
    gen = torch.Generator().manual_seed(7)
    x = rand(rows, k, dtype=torch.float16, gen=gen)
    w = rand(n, k, dtype=torch.float16, gen=gen)
    b = rand(n, dtype=torch.float16, gen=gen) if bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    for config in [(16, 128, 4, 2), (32, 256, 4, 3)] * 2:
        got = gemv_triton(x, w, b, config)
        assert got.shape == (rows, n) and got.dtype == torch.float16
        assert_rel_close(got, want, torch.float16)


@pytest.mark.parametrize("splits, expected", [(1, 1), (2, 2), (3, 2), (4, 4)])
def test_gemv_with_given_splits_matches_linear(splits, expected):
    """Splits given (benchmarks/_decode_launches.py times them) on a matrix of enough column
    tiles that split_k would not split it (140 tiles of 16 on 132 SMs): K = 4 blocks of 128,
    3 splits round to whole blocks, so 2."""
    gen = torch.Generator().manual_seed(9)
    x, w = rand(2, 512, dtype=torch.float16, gen=gen), rand(140 * 16, 512, dtype=torch.float16, gen=gen)
    config = (16, 128, 4, 2)
    assert split_k(w.shape[0], 512, 16, 128, x.device) == (1, 512)
    assert split_k(w.shape[0], 512, 16, 128, x.device, splits)[0] == expected
    want = torch.nn.functional.linear(x.float(), w.float())
    for _ in range(2):  # the split counters must be back at zero
        assert_rel_close(gemv_triton(x, w, None, config, splits=splits), want, torch.float16)


def test_linear_entry_point_takes_cublas_beyond_decode_sizes():
    gen = torch.Generator().manual_seed(8)
    x, w = rand(17, 64, dtype=torch.float16, gen=gen), rand(32, 64, dtype=torch.float16, gen=gen)
    torch.testing.assert_close(linear_triton(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("inter", [100, 1500])
@pytest.mark.parametrize("triton_fn, ref", [(silu_and_mul_triton, silu_and_mul_ref),
                                            (gelu_tanh_and_mul_triton, gelu_tanh_and_mul_ref)],
                         ids=["silu", "gelu_tanh"])
def test_gated_activations(dtype, inter, triton_fn, ref):
    gen = torch.Generator().manual_seed(4)
    gate_up = rand(5, 2 * inter, dtype=dtype, gen=gen) * 3
    torch.testing.assert_close(triton_fn(gate_up), ref(gate_up), **ELEMENTWISE_TOL[dtype])


# ---- paged attention ---------------------------------------------------------------------
def paged_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size=16, seed=0):
    """(q, k_cache, v_cache, meta): each sequence's blocks scattered over the pool; every slot
    outside a context (block 0, which padded table entries point at, included) holds NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_needed) + 4
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = []
    for ctx, nb in zip(context_lens, blocks_needed):
        table = [free.pop() for _ in range(nb)]
        tables.append(table)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)], device=DEVICE)
        k = rand(ctx, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        v = rand(ctx, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        write_kv_ref(k, v, LayerKVCache(AUTO, k_cache, v_cache), SimpleNamespace(slot_mapping=slots))
    width = max(map(len, tables)) + 1  # one spare column: padding the kernels must not follow
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        query_lens=list(query_lens),
        context_lens_host=list(context_lens),
    )
    q = rand(sum(query_lens), num_heads, head_dim, dtype=dtype, gen=gen)
    return q, k_cache, v_cache, meta


def reference(q, k_cache, v_cache, meta, scale):
    """paged_attention_ref on float32 copies: the kernels' half-precision rounding is the
    only error measured."""
    return paged_attention_ref(q.float(), LayerKVCache(AUTO, k_cache.float(), v_cache.float()), meta, scale)


GQA = [(4, 4), (4, 2), (8, 2), (8, 1), (9, 3)]
DECODE_CONTEXTS = [1, 15, 16, 17, 33, 100, 300]


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_gqa_head_dims_default_splits(num_heads, num_kv_heads, head_dim):
    q, kc, vc, meta = paged_batch([1] * 7, DECODE_CONTEXTS, num_heads, num_kv_heads, head_dim, torch.float32)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, scale)
    assert_rel_close(out, reference(q, kc, vc, meta, scale), torch.float32)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("tile_tokens,num_splits", [(16, 1), (32, 3), (64, 8), (16, 32), (16, 20)])
def test_decode_tiles_and_splits(dtype, tile_tokens, num_splits):
    # 3 splits: not a power of two; 32 splits of 16 tokens: many splits empty for short contexts,
    # merged in two levels (4 groups of 8), as 20 splits are (the last group of 4).
    q, kc, vc, meta = paged_batch([1] * 4, [17, 300, 1, 129], 8, 2, 64, dtype, seed=5)
    out = paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, 0.125,
                                 tile_tokens=tile_tokens, num_splits=num_splits)
    assert_rel_close(out, reference(q, kc, vc, meta, 0.125), dtype)


def test_decode_tiles_smaller_than_blocks_and_its_reference():
    q, kc, vc, meta = paged_batch([1] * 3, [31, 32, 95], 4, 2, 64, torch.float32, block_size=32, seed=6)
    out = paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, 0.125, tile_tokens=16)
    want = paged_decode_attention_ref(q, kc, vc, meta.block_tables, meta.context_lens, 0.125)
    assert_rel_close(out, want, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_empty_context_gives_zeros(num_splits):
    # CUDA-graph padding rows have context 0: they must come out finite, not NaN.
    q, kc, vc, meta = paged_batch([1, 1], [20, 5], 4, 2, 64, torch.float32, seed=7)
    lens = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, kc, vc, meta.block_tables, lens, 0.125, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_rel_close(out[:1], reference(q, kc, vc, meta, 0.125)[:1], torch.float32)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_in_cuda_graph_follows_device_lengths():
    q, kc, vc, meta = paged_batch([1] * 3, [300, 40, 17], 8, 2, 128, torch.bfloat16, seed=11)
    lens = meta.context_lens.clone()
    paged_decode_attention(q, kc, vc, meta.block_tables, lens, 0.125)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kc, vc, meta.block_tables, lens, 0.125)
    lens.copy_(torch.tensor([129, 1, 16]))  # shorter contexts, changed on the device only
    graph.replay()
    meta = AttentionMetadata(meta.slot_mapping, meta.block_tables, lens, meta.query_start_loc,
                             [1] * 3, [129, 1, 16])
    assert_rel_close(out, reference(q, kc, vc, meta, 0.125), torch.bfloat16)


@pytest.mark.parametrize("query_lens,context_lens,fresh", [
    ([600, 517], [600, 517], True),  # fresh prompts only
    ([600, 1], [600, 40], False),  # a decode row
    ([600], [900], False),  # a cached prefix
    ([600, 100], [600, 100], False),  # a prompt shorter than cudnn_prefill.MIN_TOKENS
])
def test_long_fresh_prompts_alone_take_cudnn_on_hopper(query_lens, context_lens, fresh):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, kc, vc, meta = paged_batch(query_lens, context_lens, 8, 2, 64, dtype, seed=3)
    cache = LayerKVCache(AUTO, kc, vc)
    hopper = ON_GPU and torch.cuda.get_device_capability() >= (9, 0)
    assert fresh_prefill_fits(q, cache, meta, None, None) == (fresh and hopper)
    assert not fresh_prefill_fits(q, cache, meta, 4096, None) and not fresh_prefill_fits(q, cache, meta, None, 30.0)
    if ON_GPU:  # the interpreter would take minutes over these lengths
        assert_rel_close(paged_attention_triton(q, cache, meta, 0.125), reference(q, kc, vc, meta, 0.125), dtype)
    if fresh:  # the path itself, on CPU through PyTorch's attention: blocks gathered, GQA, causal
        assert_rel_close(fresh_prefill_cudnn(q, cache, meta, 0.125), reference(q, kc, vc, meta, 0.125), dtype)


MIXED_QUERY_LENS = [1, 17, 1, 5, 16, 1, 70]
MIXED_CONTEXTS = [33, 17, 16, 40, 64, 1, 150]  # decodes, whole prompts, chunks over a prefix


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_mixed_batch_gqa_head_dims(num_heads, num_kv_heads, head_dim):
    q, kc, vc, meta = paged_batch(MIXED_QUERY_LENS, MIXED_CONTEXTS, num_heads, num_kv_heads, head_dim, torch.float32)
    scale = head_dim**-0.5
    out = paged_prefill_attention(q, kc, vc, meta, scale)
    assert_rel_close(out, reference(q, kc, vc, meta, scale), torch.float32)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64), (128, 32)])
def test_prefill_tile_shapes(dtype, block_m, block_n):
    q, kc, vc, meta = paged_batch(MIXED_QUERY_LENS, MIXED_CONTEXTS, 8, 2, 64, dtype, seed=8)
    out = paged_prefill_attention(q, kc, vc, meta, 0.125, block_m=block_m, block_n=block_n)
    assert_rel_close(out, reference(q, kc, vc, meta, 0.125), dtype)


def test_prefill_decode_only_rows():
    q, kc, vc, meta = paged_batch([1] * 5, [1, 16, 17, 100, 33], 9, 3, 64, torch.float32, seed=9)
    out = paged_prefill_attention(q, kc, vc, meta, 0.125)
    assert_rel_close(out, reference(q, kc, vc, meta, 0.125), torch.float32)


@pytest.mark.parametrize("query_lens,context_lens", [([1, 1, 1], [5, 40, 17]), (MIXED_QUERY_LENS, MIXED_CONTEXTS)])
def test_attention_entry_point(query_lens, context_lens):
    q, kc, vc, meta = paged_batch(query_lens, context_lens, 8, 2, 64, torch.float32, seed=10)
    out = paged_attention_triton(q, LayerKVCache(AUTO, kc, vc), meta, 0.125)
    assert_rel_close(out, reference(q, kc, vc, meta, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("head_dim", [16, 256])
@pytest.mark.parametrize("query_lens,context_lens", [([1, 1], [40, 17]), ([3, 1, 20], [40, 17, 20])])
def test_head_dims_16_and_256(dtype, head_dim, query_lens, context_lens):
    q, kc, vc, meta = paged_batch(query_lens, context_lens, 4, 2, head_dim, dtype, seed=12)
    out = paged_attention_triton(q, LayerKVCache(AUTO, kc, vc), meta, head_dim**-0.5)
    assert_rel_close(out, reference(q, kc, vc, meta, head_dim**-0.5), dtype)


# ---- dispatch ------------------------------------------------------------------------------
def test_dispatch(monkeypatch):
    assert ops_for(torch.device("cpu")) is REFERENCE_OPS
    monkeypatch.setenv("WATTSERVE_OPS", "reference")
    assert ops_for(torch.device("cuda")) is REFERENCE_OPS
    monkeypatch.delenv("WATTSERVE_OPS")
    assert ops_for(torch.device("cuda")).paged_attention.__wrapped__ is paged_attention_triton
