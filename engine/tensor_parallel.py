"""Tensor parallelism (Megatron-style) over the GPUs of one node: what one rank holds of the
model and the collectives that join the ranks' parts.

Each rank builds the decoder at its local shapes (`local_config`): 1/N of the query heads, of
the KV heads (one KV head, replicated, where there are fewer KV heads than ranks), of the
MLP's and each expert's intermediate size, and of the vocabulary (padded to a multiple of N).
Column-parallel projections (q/k/v, gate/up, the experts' gate/up) need no communication;
row-parallel ones (o_proj, down_proj, the experts' down) sum their partial outputs with one
all-reduce each; the embedding looks up the ids in its vocabulary slice and all-reduces; the
LM head's logit slices are all-gathered (every rank gets them, only rank 0 samples: for the
few rows of a step, one gather costs the same as sending them to rank 0 alone).
engine/tp_weights.py slices the checkpoint to match; engine/tp_runner.py runs the ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from wattserve.engine.config import ModelConfig, UnsupportedModelError


@dataclass(frozen=True)
class Shard:
    """This rank's place among `size` ranks. The default is the whole model on one rank,
    where every collective is the identity."""

    rank: int = 0
    size: int = 1
    vocab_size: int = 0  # the full vocabulary, which gathered logits are cut back to
    group: Any = None  # the torch.distributed process group of the ranks

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x (any shape) summed over the ranks, in place."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """weight: [local vocab, hidden], this rank's rows; ids: [n] -> [n, hidden]."""
        if self.size == 1:
            return F.embedding(ids, weight)
        local = ids - self.rank * weight.shape[0]
        outside = (local < 0) | (local >= weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), weight)
        return self.all_reduce(x.masked_fill_(outside[:, None], 0))

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [n, local vocab], this rank's slice -> [n, vocab], every rank's."""
        if self.size == 1 or logits.shape[0] == 0:  # every rank has the same n: all skip
            return logits if self.size == 1 else logits.new_empty(0, self.vocab_size)
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The shapes one of `size` ranks builds. Raises UnsupportedModelError where the model
    does not split `size` ways."""
    if size == 1:
        return cfg
    check_splits(cfg, size)
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // size, num_kv_heads=max(1, cfg.num_kv_heads // size),
        intermediate_size=cfg.intermediate_size // size if not cfg.num_experts else cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size // size, vocab_size=-(-cfg.vocab_size // size))


def check_splits(cfg: ModelConfig, size: int) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UnsupportedModelError(f"--tensor-parallel-size {size}: {what}")

    need(cfg.num_heads % size == 0, f"the {cfg.num_heads} attention heads do not divide by it")
    kv = cfg.num_kv_heads
    need(kv % size == 0 if kv >= size else size % kv == 0,
         f"the {kv} KV heads neither divide by it nor divide it (to be replicated)")
    if cfg.num_experts:
        need(cfg.moe_intermediate_size % size == 0,
             f"the experts' intermediate size {cfg.moe_intermediate_size} does not divide by it")
    else:
        need(cfg.intermediate_size % size == 0,
             f"the intermediate size {cfg.intermediate_size} does not divide by it")
    # The norm's statistic spans all heads, which the ranks split: it would take one more
    # all-reduce per layer, not built.
    need(cfg.qk_norm != "proj", "q/k norms over the whole projection (OLMo 2, OLMoE) are not sharded")


def first_kv_head(cfg: ModelConfig, shard: Shard) -> int:
    """The first KV head this rank keeps: its own 1/N, or the one its query heads read when
    the KV heads are replicated."""
    return shard.rank * cfg.num_kv_heads // shard.size
