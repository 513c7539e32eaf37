"""The KIVI (int4, int2) part of a step's attention metadata: which blocks fill up and are
quantized whole, which tokens go to their sequence's full-precision ring, and where
attention reads that ring (kernels/kv_format.py, KiviPlan)."""
from __future__ import annotations

import torch

from wattserve.engine.host_to_device import device_tensor
from wattserve.kernels.attention import KiviPlan


def ring_start(ring_from: int, context_len: int, block_size: int, ring_blocks: int) -> int:
    """The first position a sequence reads from its ring: the start of its last ring_blocks - 1
    full blocks, but never before `ring_from`, the first position it wrote to the ring
    itself (after a prefix-cache hit, the hit's blocks are only in quantized form)."""
    return max(ring_from, (context_len // block_size - (ring_blocks - 1)) * block_size)


def kivi_plan(computed: list[int], num_new: list[int], tables: list[list[int]], rings: list[tuple[int, int]],
              block_size: int, ring_blocks: int, device: torch.device) -> KiviPlan:
    """Sequence i has computed[i] tokens and writes num_new[i] more this step (flat batch, in
    order); rings[i]: its (ring, first position it wrote to the ring)."""
    bs, ring = block_size, ring_blocks
    res_tables, res_starts, mapping = [], [], []
    blocks, rows, prior, first = [], [], [], []
    flat = 0
    for start, n, table, (slot, since) in zip(computed, num_new, tables, rings):
        end = start + n
        begin = ring_start(since, end, bs, ring)
        res_tables.append([slot * ring + (begin // bs + j) % ring for j in range(ring)])
        res_starts.append(begin)
        for b in range(start // bs, end // bs):  # blocks this step fills
            blocks.append(table[b])
            rows.append(slot * ring + b % ring)
            prior.append(max(0, start - b * bs))
            first.append(flat + max(b * bs, start) - start)
        mapping.extend(-1 if p < begin else (slot * ring + p // bs % ring) * bs + p % bs for p in range(start, end))
        flat += n

    def t(x, dtype=torch.long):
        return device_tensor(x, dtype, device)

    return KiviPlan(ring_tables=t(res_tables, torch.int32), ring_starts=t(res_starts, torch.int32),
                    ring_mapping=t(mapping), flush_blocks=t(blocks), flush_ring=t(rows),
                    flush_prior=t(prior), flush_start=t(first))
