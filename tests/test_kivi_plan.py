"""The KIVI (int4, int2) plan of a step: which blocks are quantized, which tokens go to which
ring row of the residual, and where attention starts reading the ring; and the KV manager's
record of where each sequence's ring starts (a prefix-cache hit's end, a fork's parent's)."""
import torch

from wattserve.engine.kivi_plan import kivi_plan, ring_start
from wattserve.engine.kv_cache import KVCacheManager

CPU = torch.device("cpu")


def test_the_ring_starts_at_the_last_full_blocks_and_never_before_the_sequences_own():
    assert ring_start(0, 100, 64, 2) == 0  # one full block: it is still in the ring
    assert ring_start(0, 128, 64, 2) == 64
    assert ring_start(0, 130, 64, 2) == 64
    assert ring_start(0, 130, 64, 1) == 128  # int4: the partial block only
    assert ring_start(128, 130, 64, 2) == 128  # after a hit of 2 blocks: block 1 was never in this ring


def test_a_prefill_step_fills_two_blocks_and_keeps_the_last_full_one_in_the_ring():
    bs, slot = 64, 3
    table = [11, 12, 13]
    # 5 tokens computed earlier (in ring row 6); this step writes 126 more, up to position 130.
    plan = kivi_plan([5], [126], [table], [(slot, 0)], bs, 2, CPU)
    assert plan.flush_blocks.tolist() == [11, 12]
    assert plan.flush_ring.tolist() == [6, 7]  # block b in row slot * 2 + b % 2
    assert plan.flush_prior.tolist() == [5, 0]
    assert plan.flush_start.tolist() == [0, 59]  # flat index of each block's first new token
    assert plan.ring_starts.tolist() == [64]
    assert plan.ring_tables.tolist() == [[7, 6]]  # positions 64.. then 128..
    mapping = plan.ring_mapping.tolist()
    assert mapping[: 64 - 5] == [-1] * 59  # block 0: quantized, out of the ring
    assert mapping[59] == 7 * bs and mapping[59 + 63] == 7 * bs + 63  # positions 64, 127
    assert mapping[-3:] == [6 * bs, 6 * bs + 1, 6 * bs + 2]  # positions 128..130: block 0's old row


def test_a_prefix_hit_starts_the_ring_at_the_hits_end_and_a_fork_keeps_its_parents():
    kv = KVCacheManager(16, 4, num_rings=3, enable_prefix_caching=True)
    tokens = list(range(10))
    kv.allocate(1, len(tokens), kv.cached_prefix(1, tokens))
    kv.cache_full_blocks(1, tokens, len(tokens))
    assert kv.ring(1)[1] == 0
    prefix = kv.cached_prefix(2, tokens)
    assert len(prefix) == 2
    kv.allocate(2, len(tokens), prefix)
    slot, since = kv.ring(2)
    assert since == 8
    # Its first step computes tokens 8 and 9: the ring starts at 8, not at block 1 (4).
    plan = kivi_plan([8], [2], [kv.tables[2]], [(slot, since)], 4, 2, CPU)
    assert plan.ring_starts.tolist() == [8]
    assert plan.ring_mapping.tolist() == [(slot * 2) * 4, (slot * 2) * 4 + 1]
    kv.fork(2, 3, 10)
    assert kv.ring(3)[1] == 8


def test_with_a_ring_of_two_blocks_a_hit_leaves_its_last_block_to_compute_again():
    kv = KVCacheManager(16, 4, num_rings=2, enable_prefix_caching=True, ring_blocks=2)
    assert kv.prefix_to_reuse([5, 6, 7]) == [5, 6]
    assert kv.prefix_to_reuse([5]) == []
    assert KVCacheManager(16, 4, num_rings=2).prefix_to_reuse([5, 6, 7]) == [5, 6, 7]
