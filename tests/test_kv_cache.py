import pytest

from wattserve.engine.kv_cache import BlockPool, KVCacheManager


def test_allocate_grows_table_by_whole_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate(1, 5)
    assert len(kv.tables[1]) == 2
    kv.allocate(1, 8)  # still fits in two blocks
    assert len(kv.tables[1]) == 2
    kv.allocate(1, 9)
    assert len(kv.tables[1]) == 3
    assert kv.num_free_blocks == 5


def test_free_returns_blocks_and_double_free_is_caught():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    pool.release(blocks)
    assert pool.num_free == 4
    with pytest.raises(AssertionError):
        pool.release(blocks[:1])


def test_allocate_beyond_pool_raises():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    with pytest.raises(MemoryError):
        kv.allocate(1, 9)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate(1, 10)  # blocks: full, full, partial (2 of 4)
    parent = kv.tables[1]
    src, dst = kv.fork(1, 2, 10)
    child = kv.tables[2]
    assert child[:2] == parent[:2]
    assert src == parent[2] and dst == child[2] and dst != src
    assert [kv.pool.ref_counts[b] for b in parent] == [2, 2, 1]
    kv.free(1)
    assert [kv.pool.ref_counts[b] for b in child] == [1, 1, 1]
    kv.free(2)
    assert kv.num_free_blocks == 8 and all(c == 0 for c in kv.pool.ref_counts)


def test_fork_at_block_boundary_copies_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    kv.allocate(1, 8)
    assert kv.fork(1, 2, 8) is None
    assert kv.tables[2] == kv.tables[1]
    assert kv.num_free_blocks == 2
