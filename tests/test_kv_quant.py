"""Quantized KV cache on CPU: encodings' error bounds, attention over quantized blocks, and the
engine's sharing and preemption with every dtype."""
import math
from types import SimpleNamespace

import pytest
import torch

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.request import SamplingParams
from wattserve.engine.kivi_plan import kivi_plan, ring_start
from wattserve.kernels.attention import AttentionMetadata, paged_attention_ref
from wattserve.kernels.kv_format import (
    FORMATS,
    KV_CACHE_DTYPES,
    allocate_layer,
    bytes_per_block,
    kv_format,
)
from wattserve.kernels.kv_quant import (
    dequantize_fp8,
    dequantize_per_channel,
    dequantize_per_token,
    pack,
    quantize_fp8,
    quantize_per_channel,
    quantize_per_token,
    unpack,
)
from wattserve.kernels.kv_write import write_kv_ref
from test_engine_batching import QUESTIONS, assert_all_blocks_free, prompt, run

QUANTIZED = [n for n in KV_CACHE_DTYPES if n != "auto"]


def outlier_kv(*shape, seed=0):
    """Gaussian values with a few large channels of one sign, as real keys have."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] += 8.0
    x[..., 17] -= 5.0
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 1 << bits, (5, 3, 64), dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.shape == (5, 3, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), q.to(torch.int32))
    if bits == 4:  # channel c in byte c // 2, at bit 4 * (c % 2)
        assert packed[0, 0, 0].item() == q[0, 0, 0].item() | (q[0, 0, 1].item() << 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_error_is_within_half_a_step(bits):
    x = outlier_kv(40, 3, 64)
    codes, scale, zero = quantize_per_token(x, bits)
    err = (dequantize_per_token(codes, scale, zero, bits) - x).abs()
    # Half a step, plus the integer zero point's rounding (another half step at most).
    assert (err <= scale.float()[..., None] * 1.0 + 1e-6).all()
    assert (err <= scale.float()[..., None] * 0.5 + 1e-6).float().mean() > 0.95


@pytest.mark.parametrize("bits", [2, 4])
def test_per_channel_error_is_within_half_a_step_per_channel(bits):
    x = outlier_kv(64, 3, 64)
    codes, scale, minimum = quantize_per_channel(x, bits)
    assert scale.shape == minimum.shape == (3, 64)
    err = (dequantize_per_channel(codes, scale, minimum, bits) - x).abs()
    assert (err <= scale.float()[None] * 0.5 + 2e-3 * x.abs()).all()  # + fp16 rounding of min


def test_fp8_relative_error_is_within_e4m3_rounding():
    x = outlier_kv(40, 3, 64)
    codes, scale = quantize_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn
    err = (dequantize_fp8(codes, scale) - x).abs()
    # 3 mantissa bits: half an ulp is 2**-4 relative; tiny values are limited by the subnormal step.
    assert (err <= x.abs() * 2**-4 + scale.float()[..., None] * 2**-9 + 1e-7).all()


def test_zero_rows_encode_exactly():
    x = torch.zeros(4, 2, 64)
    for bits in (2, 4, 8):
        assert torch.equal(dequantize_per_token(*quantize_per_token(x, bits), bits), x)
    assert torch.equal(dequantize_per_channel(*quantize_per_channel(x, 2), 2), x)
    assert torch.equal(dequantize_fp8(*quantize_fp8(x)), x)


@pytest.mark.parametrize("name, at_least", [("fp8_e4m3", 1.9), ("int8", 1.9), ("int4", 3.5), ("int2", 6.0)])
@pytest.mark.parametrize("heads, head_dim", [(3, 64), (8, 128)])
def test_capacity_per_gib_against_bf16(name, at_least, heads, head_dim):
    fmt = kv_format(name)
    bs = 64 if fmt.kivi else 16
    bf16 = bytes_per_block(FORMATS["auto"], 16, heads, head_dim, torch.bfloat16) / 16
    assert bf16 / (bytes_per_block(fmt, bs, heads, head_dim, torch.bfloat16) / bs) >= at_least


# ---- the write and attention references over a quantized paged cache ----------------------
def dense(q, k, v, scale):
    """Causal attention of the last len(q) positions over k, v [ctx, KVH, D], float64."""
    n, ctx, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("nhd,thd->hnt", q.double(), k) * scale
    s = s.masked_fill(torch.arange(ctx)[None, :] > torch.arange(ctx - n, ctx)[:, None], -math.inf)
    return torch.einsum("hnt,thd->nhd", s.softmax(-1), v)


def expected_cache_contents(name, k, v, block_size):
    """What a sequence's K and V [ctx, KVH, D] read back as: each full block (every block, for
    per-token formats) quantized, a KIVI format's positions from its ring start on exact,
    and a sink format's position 0 at int8 before that."""
    fmt = kv_format(name)
    if fmt.fp8:
        return dequantize_fp8(*quantize_fp8(k)), dequantize_fp8(*quantize_fp8(v))
    if not fmt.kivi:
        return (dequantize_per_token(*quantize_per_token(k, fmt.bits), fmt.bits),
                dequantize_per_token(*quantize_per_token(v, fmt.bits), fmt.bits))
    kk, vv = k.clone(), v.clone()
    begin = ring_start(0, k.shape[0], block_size, fmt.ring_blocks)
    for b in range(begin // block_size):
        rows = slice(b * block_size, (b + 1) * block_size)
        kk[rows] = dequantize_per_channel(*quantize_per_channel(k[rows], fmt.bits), fmt.bits)
        vv[rows] = dequantize_per_token(*quantize_per_token(v[rows], fmt.bits), fmt.bits)
    if fmt.sink and begin > 0:
        kk[0], vv[0] = dequantize_per_token(*quantize_per_token(torch.stack([k[0], v[0]]), 8), 8)
    return kk, vv


def write_in_steps(cache, table, ring, k, v, steps):
    """Write one sequence's K/V in steps of the given sizes, as the engine would; returns the
    last step's KIVI plan (None for other formats)."""
    bs, start, plan = cache.block_size, 0, None
    for n in steps:
        end = start + n
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start, end)])
        meta = SimpleNamespace(slot_mapping=slots, kivi=None)
        if cache.fmt.kivi:
            plan = meta.kivi = kivi_plan([start], [n], [table], [(ring, 0)], bs,
                                         cache.fmt.ring_blocks, torch.device("cpu"))
        write_kv_ref(k[start:end], v[start:end], cache, meta)
        start = end
    return plan


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("steps", [[100], [7, 1, 1, 30, 1, 60], [64, 64, 3]])
def test_attention_over_a_quantized_cache_equals_dense_attention_on_its_contents(name, steps):
    num_heads, kvh, d, bs = 8, 2, 64, kv_format(name).kivi and 32 or 16
    ctx = sum(steps)
    gen = torch.Generator().manual_seed(1)
    k, v = outlier_kv(ctx, kvh, d, seed=2), torch.randn(ctx, kvh, d, generator=gen)
    nb = -(-ctx // bs)
    cache = allocate_layer(kv_format(name), nb + 3, bs, kvh, d, torch.float32, torch.device("cpu"), 2)
    table = torch.randperm(nb + 3, generator=gen)[:nb].tolist()  # scattered blocks
    plan = write_in_steps(cache, table, 1, k, v, steps)
    want_k, want_v = expected_cache_contents(name, k, v, bs)
    qlen = steps[-1]
    q = torch.randn(qlen, num_heads, d, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), block_tables=torch.tensor([table], dtype=torch.int32),
        context_lens=torch.tensor([ctx], dtype=torch.int32), query_start_loc=torch.tensor([0, qlen], dtype=torch.int32),
        query_lens=[qlen], context_lens_host=[ctx],
        kivi=plan,
    )
    out = paged_attention_ref(q, cache, meta, d**-0.5)
    torch.testing.assert_close(out.double(), dense(q, want_k, want_v, d**-0.5), rtol=1e-4, atol=1e-4)
    # And the quantization error itself is bounded against the exact cache.
    exact = dense(q, k, v, d**-0.5)
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    # (2 bits on Gaussian keys with outlier channels: the loss KIVI trades for 6.5x capacity.)
    assert rel < {"fp8_e4m3": 0.06, "int8": 0.03, "int4": 0.15, "int2": 0.8}[name]


# ---- the engine: sharing, forks, preemption with quantized blocks -------------------------
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_preemption_and_forks_with_quantized_blocks(name):
    """Eight requests through 6 KIVI blocks of 64 (or 24 of 16) tokens: preemption happens and
    every request completes; n = 3 greedy forks equal n = 1; every block and ring is
    freed. Recomputing a preempted sequence runs its generated tokens through prefill instead
    of decode, whose float rounding differs by ~1e-6; a value that close to a quantization
    boundary gets the other code, so later tokens may differ (batching alone changes the
    rounding too): the outputs must agree on their first token and on most of the rest, not
    on all (a cache read from the wrong blocks agrees on almost none)."""
    fmt = kv_format(name)
    bs = 64 if fmt.kivi else 16
    num_blocks = 384 // bs
    per_block = 30 * bytes_per_block(fmt, bs, 3, 64, torch.float32)
    residual = 30 * 2 * bs * 3 * 64 * 4 * (8 if fmt.kivi else 0)
    engine = EngineCore(EngineConfig(
        cache=CacheConfig(kv_cache_dtype=name, kv_cache_memory=num_blocks * per_block + residual),
        scheduler=SchedulerConfig(max_num_seqs=8)))
    assert engine.kv.pool.num_blocks == num_blocks
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    questions = QUESTIONS[:8]
    alone = {q: run(engine, {"a": (prompt(engine, q), greedy)})[0]["a"] for q in questions}
    assert engine.scheduler.num_preemptions == 0
    together, _ = run(engine, {q: (prompt(engine, q), greedy) for q in questions})
    assert engine.scheduler.num_preemptions > 0
    agree = total = 0
    for q in questions:
        (got,), (want,) = together[q], alone[q]
        assert len(got) == 40 and got[0] == want[0]
        agree += sum(a == b for a, b in zip(got, want))
        total += 40
    assert agree / total >= 0.6  # 0.82 for int8 and 1.0 for int4 on a 2-core x86 CPU
    forked, _ = run(engine, {"n3": (prompt(engine, questions[0]), SamplingParams(temperature=0, max_tokens=40,
                                                                                ignore_eos=True, n=3))})
    assert forked["n3"] == alone[questions[0]] * 3
    assert_all_blocks_free(engine)
    assert engine.kv.num_rings_held == 0


@pytest.mark.parametrize("ends_on_a_block", [False, True])
def test_int2_forks_copy_the_ring(ends_on_a_block):
    """n = 3 equals n = 1: the ring holds the partial block and the last full one, so the
    children need its copy even when the prompt ends on a block boundary (no block copied)."""
    engine = EngineCore(EngineConfig(cache=CacheConfig(kv_cache_dtype="int2", kv_cache_memory=64 << 20),
                                     scheduler=SchedulerConfig(max_num_seqs=4)))
    ids = prompt(engine, QUESTIONS[0])
    bs = engine.kv.block_size
    if ends_on_a_block:
        ids = (ids * (2 * bs))[: 2 * bs]
    assert (len(ids) % bs == 0) == ends_on_a_block
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    alone = run(engine, {"a": (ids, SamplingParams(**greedy))})[0]["a"]
    forked = run(engine, {"b": (ids, SamplingParams(**greedy, n=3))})[0]["b"]
    assert forked == alone * 3
    assert_all_blocks_free(engine)
