"""The paged attention reference against plain causal attention over contiguous K/V."""
import math
from types import SimpleNamespace

import pytest
import torch

from wattserve.kernels.attention import AttentionMetadata, paged_attention_ref
from wattserve.kernels.kv_format import FORMATS, LayerKVCache
from wattserve.kernels.kv_write import write_kv_ref


def dense_causal(q, k, v, scale):
    """q: [n, H, D] for the last n positions of k, v: [ctx, KVH, D]."""
    n, ctx = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k.double()) * scale
    pos_q = torch.arange(ctx - n, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > pos_q, -math.inf)
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v.double()).to(q.dtype)


def build_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))  # poison: a read of an unwritten slot shows
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered over the pool
    tables, slots, full_k, full_v, qs = [], [], [], [], []
    for qlen, ctx in zip(query_lens, context_lens):
        nb = -(-ctx // block_size)
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        seq_slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        write_kv_ref(k, v, LayerKVCache(FORMATS["auto"], k_cache, v_cache), SimpleNamespace(slot_mapping=seq_slots))
        slots.append(seq_slots[ctx - qlen:])
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(qlen, num_heads, head_dim, generator=gen))
    width = max(len(t) for t in tables)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        query_lens=list(query_lens),
        context_lens_host=list(context_lens),
    )
    return torch.cat(qs), LayerKVCache(FORMATS["auto"], k_cache, v_cache), meta, full_k, full_v


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_prefill_and_decode_batch(num_heads, num_kv_heads, head_dim):
    # Decodes, a whole prompt, a chunk over a cached prefix, block-boundary and odd lengths.
    query_lens = [1, 17, 1, 5, 16, 1]
    context_lens = [33, 17, 16, 40, 64, 1]
    q, cache, meta, ks, vs = build_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, 16)
    scale = head_dim**-0.5
    out = paged_attention_ref(q, cache, meta, scale)
    for i, (n, s) in enumerate(zip(query_lens, meta.query_start_loc.tolist())):
        want = dense_causal(q[s : s + n], ks[i], vs[i], scale)
        torch.testing.assert_close(out[s : s + n], want, rtol=1e-5, atol=1e-5)


def test_decode_only_batch_long_contexts():
    query_lens = [1] * 5
    context_lens = [1, 15, 16, 17, 300]
    q, cache, meta, ks, vs = build_batch(query_lens, context_lens, 8, 2, 64, 16, seed=1)
    out = paged_attention_ref(q, cache, meta, 0.125)
    for i in range(5):
        torch.testing.assert_close(out[i : i + 1], dense_causal(q[i : i + 1], ks[i], vs[i], 0.125),
                                   rtol=1e-5, atol=1e-5)


def test_decode_batch_of_equal_contexts_needs_no_mask():
    q, cache, meta, ks, vs = build_batch([1, 1, 1], [40, 40, 40], 8, 2, 64, 16, seed=2)
    out = paged_attention_ref(q, cache, meta, 0.125)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], dense_causal(q[i : i + 1], ks[i], vs[i], 0.125),
                                   rtol=1e-5, atol=1e-5)
