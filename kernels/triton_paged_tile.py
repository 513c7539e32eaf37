"""One online-softmax step over a tile of paged K/V: shared by the decode and prefill kernels.

A tile of one sequence's token positions is gathered through its block-table row; a
dequantizing variant of the KV cache changes only `_load_kv`. Scores are in the log2 domain
(the softmax scale carries log2(e)) so the kernels use exp2.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the launchers pass scale * LOG2E


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
def attend_tile(
    acc, m, l, q, q_pos, start, kv_end, table_ptr, k_cache_ptr, v_cache_ptr, kv_head,
    stride_block, stride_tok, stride_head, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys start .. start+BLOCK_N-1 (those < kv_end) into the running softmax.

    acc: [M, HEAD_DIM], m, l: [M] float32 (running max, sum); q: [M, HEAD_DIM] in the cache
    dtype; q_pos: [M] each row's position, used when CAUSAL (a row sees keys <= its
    position). Without CAUSAL every key of the tile must be visible to every row.
    """
    tok = start + tl.arange(0, BLOCK_N)
    valid = tok < kv_end
    offsets = _kv_offsets(table_ptr, tok, valid, kv_head, stride_block, stride_tok, stride_head,
                          HEAD_DIM, BLOCK_SIZE)
    # Both loads issued before the first use: V's latency hides behind K's and the dot.
    k = _load_kv(k_cache_ptr, offsets, valid)
    v = _load_kv(v_cache_ptr, offsets, valid)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where(valid[None, :] & (tok[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l
