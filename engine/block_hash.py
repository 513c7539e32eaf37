"""Prefix-cache keys of full KV blocks: one hash chain over a sequence's token ids.

Block i's key is sha256(key of block i - 1, its token ids), so a key stands for the block's
tokens and every token before them: equal keys mean equal K and V. The chain starts from a
seed of the KV cache dtype and the block size, so blocks written in one format are never read
as another's. sha256 rather than Python's hash(): a collision would hand one prompt's KV to
another, and prompts come from clients (vLLM offers sha256 for the same reason).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from wattserve.engine.sequence import PLACEHOLDER


def chain_seed(kv_cache_dtype: str, block_size: int) -> bytes:
    return hashlib.sha256(f"wattserve kv {kv_cache_dtype} {block_size}".encode()).digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int, seed: bytes) -> None:
    """Append to `hashes` (the keys of the first blocks of `token_ids`) the keys of the
    remaining full blocks; a partly filled last block has none, nor (yet) a block holding a
    PLACEHOLDER, a token still on its way from the device (engine/core.py launches ahead)."""
    for i in range(len(hashes), len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        if PLACEHOLDER in block:
            return
        parent = hashes[-1] if hashes else seed
        hashes.append(hashlib.sha256(parent + array("q", block).tobytes()).digest())
