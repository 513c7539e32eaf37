"""CUDA graphs for decode steps: one graph per padded batch size, captured at startup.

A decode step of a 32-layer model is ~350 small kernel launches; replaying a graph turns
them into one launch, so batch-1 decode runs at the speed of its memory traffic instead of
the speed of Python. Inputs live in static buffers the graphs were captured on; a step
copies its tensors in, pads the unused rows so they read valid memory and write nothing
(slot -1), replays, and reads the first rows of the static output.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import fields

import torch

from wattserve.kernels.attention import AttentionMetadata, KiviPlan
from wattserve.kernels.kv_format import LayerKVCache

log = logging.getLogger("wattserve.engine")


def _fields(plan: KiviPlan) -> list[torch.Tensor]:
    return [getattr(plan, f.name) for f in fields(plan)]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (as vLLM pads): little padding waste."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs + 8, 8))
    return sorted({min(b, max_num_seqs) for b in sizes})


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[LayerKVCache], max_num_seqs: int, max_blocks_per_seq: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = graph_batch_sizes(max_num_seqs)
        n = self.sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.long)
            self.positions = torch.zeros(n, dtype=torch.long)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.long)
            self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32)
            self.context_lens = torch.ones(n, dtype=torch.int32)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
            self.hidden = torch.zeros(n, hidden_size, dtype=dtype)
            # KIVI formats: a decode step fills at most one block per sequence (flush rows padded -1).
            fmt = kv_caches[0].fmt
            self.kivi = None if not fmt.kivi else KiviPlan(
                ring_tables=torch.zeros(n, fmt.ring_blocks, dtype=torch.int32),
                ring_starts=torch.zeros(n, dtype=torch.int32),
                ring_mapping=torch.full((n,), -1, dtype=torch.long),
                flush_blocks=torch.full((n,), -1, dtype=torch.long),
                flush_ring=torch.zeros(n, dtype=torch.long),
                flush_prior=torch.zeros(n, dtype=torch.long),
                flush_start=torch.zeros(n, dtype=torch.long),
            )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            query_lens=[1] * bs, context_lens_host=[1] * bs,
            kivi=None if self.kivi is None else KiviPlan(*(t[:bs] for t in _fields(self.kivi))),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)
            self.hidden[:bs] = self.model(*args)  # warm-up: compile kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Inputs of `n` decoding sequences -> hidden states [n, hidden]."""
        n = input_ids.shape[0]
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.context_lens[:n].copy_(meta.context_lens, non_blocking=True)
        if bs > n:  # padding rows: attend to one (any) cached token, write no slot
            self.slot_mapping[n:bs].fill_(-1)
            self.context_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].fill_(0)
        if self.kivi is not None:
            self._copy_kivi(meta.kivi, n, bs)
        self.graphs[bs].replay()
        return self.hidden[:n]

    def _copy_kivi(self, plan: KiviPlan, n: int, bs: int) -> None:
        static, flushes = self.kivi, plan.flush_blocks.shape[0]
        for name in ("ring_tables", "ring_starts", "ring_mapping"):
            getattr(static, name)[:n].copy_(getattr(plan, name), non_blocking=True)
        for name in ("flush_blocks", "flush_ring", "flush_prior", "flush_start"):
            getattr(static, name)[:flushes].copy_(getattr(plan, name), non_blocking=True)
        static.flush_blocks[flushes:bs].fill_(-1)
        static.ring_mapping[n:bs].fill_(-1)
        static.ring_tables[n:bs].fill_(0)
        static.ring_starts[n:bs].fill_(0)
