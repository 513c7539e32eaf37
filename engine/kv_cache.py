"""Paged KV cache bookkeeping: a pool of fixed-size blocks and one block table per sequence.

Only ids, reference counts and prefix-cache keys live here; the tensors that hold K and V
are owned by the model runner (`[num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]`). Token `i` of a sequence lives in block `table[i // block_size]` at offset
`i % block_size`, i.e. in slot `table[i // block_size] * block_size + i % block_size`.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from wattserve.engine.block_hash import chain_seed, extend_block_hashes


class BlockPool:
    """Owns block ids, their reference counts and the prefix-cache keys of full blocks.

    A block is free when its count is zero. A free block that holds a key stays findable by it
    (`lookup`) until its memory is needed: allocation takes free blocks without a key first,
    then evicts keyed ones, least recently freed first (LRU), dropping their keys."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free blocks with a key, LRU first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks findable by key, in use or free."""
        return len(self._block_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = [self._take_free() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1

    def reuse(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks that `lookup` found, free ones included."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._evictable[b]
            self.ref_counts[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def cache(self, block: int, key: bytes) -> None:
        """Make a full block findable by its key. When another block already holds the same
        tokens (two sequences prefilled them in one step), that one stays the cached copy."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def forget_cached(self) -> None:
        """Drop every key (the prefix cache empties); the blocks must all be free."""
        assert self.num_free == self.num_blocks, "blocks still in use"
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._key_of.clear()
        self._block_of.clear()

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of `keys`, from the first, that is cached."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks


class KVCacheManager:
    """Maps sequences to blocks: grow a table to hold more tokens, fork it, free it.

    With `num_rings` (a KIVI cache: int4, int2; kernels/kv_format.py) every sequence holding
    blocks also holds one ring: its last blocks in full precision (engine/kivi_plan.py).

    With prefix caching, each block that fills with computed tokens is registered under its key
    (engine/block_hash.py), and a sequence being admitted starts from the cached blocks of its
    longest matching prefix. Only full blocks are keyed, so with KIVI a hit ends on a block
    boundary and the sequence starts with an empty ring, as a new one does, from the
    hit's end on (`ring`), and with a ring of several blocks a little before the hit's end
    (`prefix_to_reuse`)."""

    def __init__(self, num_blocks: int, block_size: int, num_rings: int = 0, *,
                 enable_prefix_caching: bool = False, kv_cache_dtype: str = "auto", ring_blocks: int = 1):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.uses_rings = num_rings > 0
        self._free_rings: deque[int] = deque(range(num_rings))
        self._ring_of: dict[int, int] = {}
        self.ring_blocks = ring_blocks  # a ring's blocks (kernels/kv_format.py)
        self._ring_from: dict[int, int] = {}  # per sequence, the first position in its ring
        self.enable_prefix_caching = enable_prefix_caching
        self._seed = chain_seed(kv_cache_dtype, block_size)
        self._keys: dict[int, list[bytes]] = {}  # per sequence, its full blocks' keys so far
        self._num_keyed: dict[int, int] = {}  # per sequence, how many of its blocks are registered

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks a sequence needs to hold `num_tokens` tokens in all."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def reusable_keys(self, seq_id: int, token_ids: list[int]) -> list[bytes]:
        """Keys of the full blocks a sequence could take from the cache: all but the one
        holding its last token, whose logits must be computed."""
        if not self.enable_prefix_caching:
            return []
        return self._keys_of(seq_id, token_ids)[: (len(token_ids) - 1) // self.block_size]

    def cached_prefix(self, seq_id: int, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest run of the sequence's reusable blocks."""
        return self.pool.lookup(self.reusable_keys(seq_id, token_ids))

    def prefix_to_reuse(self, cached: list[int]) -> list[int]:
        """The blocks of a `cached_prefix` a sequence starts from: all of them, but with a
        ring of R blocks (int2) not the last R - 1. Those it computes again, into its
        ring, so that it reads them in full precision as it would have without the cache."""
        return cached[: max(0, len(cached) - (self.ring_blocks - 1))]

    def keys_filled(self, seq_id: int, token_ids: list[int], start: int, end: int) -> list[bytes]:
        """Keys of the blocks that computing tokens [start, end) fills."""
        first, end_block = start // self.block_size, end // self.block_size
        if not self.enable_prefix_caching or first == end_block:  # most decode steps
            return []
        return self._keys_of(seq_id, token_ids)[first:end_block]

    def can_admit(self, seq_id: int, prefix: list[int], num_tokens: int) -> bool:
        """Room for a sequence without blocks to hold `num_tokens` tokens, starting from the cached
        `prefix` blocks: new blocks for the rest, plus the prefix blocks that sit free (reusing
        them takes them off the free list), and a free ring with KIVI. Rings are as many as
        the running sequences may be, but a sequence that took its last token in a step launched
        ahead has left the running ones and holds its ring until that token is read."""
        revived = sum(self.pool.ref_counts[b] == 0 for b in prefix)
        return self.can_allocate(self.blocks_needed(seq_id, num_tokens) - len(prefix) + revived) \
            and (not self.uses_rings or bool(self._free_rings))

    def allocate(self, seq_id: int, num_tokens: int, prefix: list[int] | None = None) -> None:
        """Grow the sequence's table so it holds `num_tokens` tokens (raises MemoryError); a
        sequence without blocks starts from the cached `prefix` blocks, shared."""
        if prefix:
            # Referenced before anything is allocated, so the allocation cannot evict them.
            self.pool.reuse(prefix)
            self.tables[seq_id] = list(prefix)
            self._num_keyed[seq_id] = len(prefix)
        need = self.blocks_needed(seq_id, num_tokens)
        table = self.tables.setdefault(seq_id, [])
        if need:
            table.extend(self.pool.allocate(need))
        self._take_ring(seq_id, len(prefix or ()) * self.block_size)

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the sequence's blocks that are full of computed tokens (prompt or generated),
        so that later sequences can share them; call after the step that computed them."""
        if not self.enable_prefix_caching:
            return
        done, full = self._num_keyed.get(seq_id, 0), num_computed_tokens // self.block_size
        if full <= done:
            return
        keys, table = self._keys_of(seq_id, token_ids), self.tables[seq_id]
        full = min(full, len(keys))  # a block with a token not yet read back waits for a later step
        for i in range(done, full):
            self.pool.cache(table[i], keys[i])
        self._num_keyed[seq_id] = full

    def _keys_of(self, seq_id: int, token_ids: list[int]) -> list[bytes]:
        keys = self._keys.setdefault(seq_id, [])
        extend_block_hashes(keys, token_ids, self.block_size, self._seed)
        return keys

    def _take_ring(self, seq_id: int, ring_from: int) -> None:
        if self.uses_rings and seq_id not in self._ring_of:
            if not self._free_rings:
                raise MemoryError("no free KIVI ring")
            self._ring_of[seq_id] = self._free_rings.popleft()
            self._ring_from[seq_id] = ring_from

    def ring(self, seq_id: int) -> tuple[int, int]:
        """(its ring, the first position the sequence keeps there): what a step's KIVI plan
        needs of it (engine/kivi_plan.py)."""
        return self._ring_of[seq_id], self._ring_from[seq_id]

    @property
    def num_rings_held(self) -> int:
        return len(self._ring_of)

    def can_fork(self) -> bool:
        """Room for one more sequence sharing a running one's blocks."""
        return self.can_allocate(1) and (not self.uses_rings or bool(self._free_rings))

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> tuple[int, int] | None:
        """Give `child_id` the parent's first `num_tokens` tokens. Full blocks are shared
        (reference counted); a partly filled last block is copied, because both sequences
        will write their own next tokens into it. Returns (src, dst) of that copy, if any."""
        parent = self.tables[parent_id]
        full = num_tokens // self.block_size
        shared = parent[:full]
        self.pool.share(shared)
        child = list(shared)
        copy = None
        if num_tokens % self.block_size:
            (dst,) = self.pool.allocate(1)
            copy = (parent[full], dst)
            child.append(dst)
        self.tables[child_id] = child
        if self.uses_rings:  # the child's ring is a copy of the parent's (engine/scheduler.py)
            self._take_ring(child_id, self._ring_from[parent_id])
        return copy

    def free(self, seq_id: int) -> None:
        """Drop the sequence's references; blocks other sequences use stay theirs. Last block
        first: cached ones are evicted in the order freed, and a prefix's later blocks are
        worth less than its first (they match only after them, and fewer prompts share them)."""
        self.pool.release(reversed(self.tables.pop(seq_id, [])))
        self._keys.pop(seq_id, None)
        self._num_keyed.pop(seq_id, None)
        self._ring_from.pop(seq_id, None)
        ring = self._ring_of.pop(seq_id, None)
        if ring is not None:
            self._free_rings.append(ring)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free
