"""The mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE) and its checkpoint names.

It stands in a decoder layer's `mlp` when the config has experts. Parameters, per layer:
  mlp.gate.weight:          [num_experts, hidden]  the router
  mlp.experts.gate_up_proj: [num_experts, 2 * moe_intermediate, hidden]  gate rows, then up
  mlp.experts.down_proj:    [num_experts, hidden, moe_intermediate]
Checkpoints store one tensor per expert and projection; `expert_slot` says where each goes.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from wattserve.engine.config import ModelConfig
from wattserve.engine.tensor_parallel import Shard
from wattserve.kernels.dispatch import Ops

# Mixtral's names for the same tensors: block_sparse_moe.{gate, experts.E.w1/w3/w2}.
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_TENSOR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class SparseMoeBlock(nn.Module):
    """Under tensor parallelism every rank routes every token (the router is replicated) and
    holds a slice of each expert's intermediate size; the down projections' partial sums are
    all-reduced."""

    # The router and the experts both read x: the norm before the block writes it plain.
    input_weight = None

    def __init__(self, cfg: ModelConfig, ops: Ops, shard: Shard = Shard()):
        super().__init__()
        self.ops, self.shard = ops, shard
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        weights, ids = self.ops.route(x, self.gate.weight, self.top_k, self.renormalize)
        out = self.ops.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return self.shard.all_reduce(out)


def canonical_name(name: str) -> str:
    """A checkpoint tensor name with Mixtral's MoE names replaced by the model's."""
    if ".block_sparse_moe." not in name:
        return name
    name = name.replace(".block_sparse_moe.", ".mlp.")
    stem, _, leaf = name.rpartition(".")
    parent, _, proj = stem.rpartition(".")
    return f"{parent}.{_MIXTRAL_PROJ[proj]}.{leaf}" if proj in _MIXTRAL_PROJ else name


def expert_slot(name: str, cfg: ModelConfig) -> tuple[str, int, int] | None:
    """(stacked parameter, expert, first row) of one expert's projection; None for any
    other tensor. `name` is canonical, without the "model." prefix."""
    m = _EXPERT_TENSOR.match(name)
    if m is None:
        return None
    experts, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down_proj":
        return f"{experts}.down_proj", expert, 0
    return f"{experts}.gate_up_proj", expert, 0 if proj == "gate_proj" else cfg.moe_intermediate_size


def expected_expert_slots(param_name: str, cfg: ModelConfig) -> Iterable[tuple[int, int]]:
    """The (expert, first row) pieces a stacked expert parameter is loaded in."""
    rows = (0, cfg.moe_intermediate_size) if param_name.endswith("gate_up_proj") else (0,)
    return ((e, r) for e in range(cfg.num_experts) for r in rows)
