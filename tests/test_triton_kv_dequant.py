"""Long prefills over a quantized cache: contexts dequantized once into a model-dtype scratch
cache (kernels/triton_kv_dequant.py), then the unquantized prefill kernel.

The scratch must hold exactly what the reference reads (attention._gather: codes dequantized in
float32 and rounded to the model dtype, KIVI rings, int2's sink), position by position, for
caches poisoned wherever nothing was written; and the entry point must take the path only
where it pays off and give the reference's attention there.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import pytest
import torch

from wattserve.kernels import triton_attention, triton_kv_dequant
from wattserve.kernels.attention import _gather
from wattserve.kernels.triton_kv_dequant import dense_bytes, dense_pays_off, dequantize_contexts

from test_triton_kernels import ON_GPU, assert_rel_close
from test_triton_kv_quant import MIXED_CONTEXTS, MIXED_QUERY_LENS, QUANTIZED, quantized_batch, reference


@pytest.mark.parametrize("name,block_size,dtype", [
    ("fp8_e4m3", 16, torch.float16), ("int8", 16, torch.float32), ("int4", 16, torch.float16),
    ("int2", 16, torch.float32), ("int4", 64, torch.bfloat16 if ON_GPU else torch.float16),
])
def test_scratch_holds_the_references_values(name, block_size, dtype):
    q, cache, meta = quantized_batch(name, MIXED_QUERY_LENS, MIXED_CONTEXTS, 8, 2, 64, dtype, block_size, seed=6)
    dense, dense_meta = dequantize_contexts(cache, meta, dtype)
    assert dense.k.dtype == dtype and dense.fmt.name == "auto"
    assert dense.k.numel() * dense.k.element_size() * 2 == dense_bytes(cache, meta, dtype)
    for i, ctx in enumerate(meta.context_lens_host):
        want_k, want_v = _gather(cache, meta, [i], ctx, dtype)
        blocks = dense_meta.block_tables[i, : -(-ctx // block_size)].long()
        got_k, got_v = (t[blocks].flatten(0, 1)[:ctx] for t in (dense.k, dense.v))
        # KIVI keys: the kernel may fuse c * s + m into one rounding (an FMA), the reference rounds twice.
        exact = not (cache.fmt.kivi and ON_GPU)
        for got, want in ((got_k, want_k[0]), (got_v, want_v[0])):
            if exact:
                assert torch.equal(got, want), f"sequence {i}"
            else:
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", QUANTIZED)
def test_entry_point_takes_the_scratch_where_it_pays_off(name, monkeypatch):
    dtype = torch.float16
    q, cache, meta = quantized_batch(name, MIXED_QUERY_LENS, MIXED_CONTEXTS, 8, 2, 64, dtype, 16, seed=7)
    calls = []

    def spy(*args):
        calls.append(args)
        return dequantize_contexts(*args)

    monkeypatch.setattr(triton_attention, "dequantize_contexts", spy)
    monkeypatch.setattr(triton_kv_dequant, "DENSE_MIN_QUERIES_PER_KEY", meta.queries_per_key)
    out = triton_attention.paged_attention_triton(q, cache, meta, 0.125)
    assert len(calls) == 1
    assert_rel_close(out, reference(q, cache, meta, 0.125), dtype)
    # Fewer queries per key than the threshold, or a scratch over the budget: in registers.
    monkeypatch.setattr(triton_kv_dequant, "DENSE_MIN_QUERIES_PER_KEY", meta.queries_per_key * 1.01)
    assert not dense_pays_off(cache, meta, dtype)
    monkeypatch.setattr(triton_kv_dequant, "DENSE_MIN_QUERIES_PER_KEY", 1)
    monkeypatch.setattr(triton_kv_dequant, "DENSE_MAX_BYTES", dense_bytes(cache, meta, dtype) - 1)
    assert not dense_pays_off(cache, meta, dtype)


def test_queries_per_key_weighs_each_sequence_by_its_keys():
    _, cache, meta = quantized_batch("int8", [1, 30], [100, 30], 8, 2, 64, torch.float32, 16)
    assert meta.queries_per_key == pytest.approx((1 * 100 + 30 * 30) / 130)
    assert not dense_pays_off(cache, meta, torch.float32)  # the default threshold: many query tiles per key
