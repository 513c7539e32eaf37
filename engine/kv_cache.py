"""Paged KV cache bookkeeping: a pool of fixed-size blocks and one block table per sequence.

Only ids and reference counts live here; the tensors that hold K and V are owned by the model
runner (`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`). Token `i` of a
sequence lives in block `table[i // block_size]` at offset `i % block_size`, i.e. in slot
`table[i // block_size] * block_size + i % block_size`.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    """Owns block ids and their reference counts; a block is free when its count is zero."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)


class KVCacheManager:
    """Maps sequences to blocks: grow a table to hold more tokens, fork it, free it.

    With `num_residual_slots` (a KIVI cache: int4, int2; kernels/kv_format.py) every sequence holding
    blocks also holds one residual slot, for its partly filled last block."""

    def __init__(self, num_blocks: int, block_size: int, num_residual_slots: int = 0):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.uses_residual = num_residual_slots > 0
        self._free_residual: deque[int] = deque(range(num_residual_slots))
        self.residual_slots: dict[int, int] = {}

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks a sequence needs to hold `num_tokens` tokens in all."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow the sequence's table so it holds `num_tokens` tokens (raises MemoryError)."""
        need = self.blocks_needed(seq_id, num_tokens)
        table = self.tables.setdefault(seq_id, [])
        if need:
            table.extend(self.pool.allocate(need))
        self._take_residual(seq_id)

    def _take_residual(self, seq_id: int) -> None:
        if self.uses_residual and seq_id not in self.residual_slots:
            if not self._free_residual:
                raise MemoryError("no free residual slot")
            self.residual_slots[seq_id] = self._free_residual.popleft()

    def can_fork(self) -> bool:
        """Room for one more sequence sharing a running one's blocks."""
        return self.can_allocate(1) and (not self.uses_residual or bool(self._free_residual))

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
        self._take_residual(child_id)
        return copy

    def free(self, seq_id: int) -> None:
        self.pool.release(self.tables.pop(seq_id, []))
        slot = self.residual_slots.pop(seq_id, None)
        if slot is not None:
            self._free_residual.append(slot)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free
