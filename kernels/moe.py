"""Mixture-of-experts feed-forward: route each token to its top-k experts, run each expert's
SwiGLU MLP on the tokens sent to it, and sum the outputs weighted by the router.

`route_ref` (the router: its matmul, then `select_experts`) and `fused_moe_ref` (the
experts) are the CPU path and the oracles of kernels/triton_moe_routing.py and
kernels/triton_moe.py.

Expert weights are stacked per layer, as transformers 5 holds them in memory:
  w_gate_up: [num_experts, 2 * intermediate, hidden]  rows: gate then up
  w_down:    [num_experts, hidden, intermediate]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wattserve.kernels.quant_linear import linear_ref


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [num_tokens, num_experts] -> (weights [num_tokens, top_k] float32,
    expert ids [num_tokens, top_k] int64).

    The softmax runs over all experts in float32 (as transformers does); `renormalize`
    rescales the k chosen probabilities to sum to 1 (Mixtral always, Qwen3-MoE with
    norm_topk_prob, OLMoE not).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_ref(x: torch.Tensor, router_weight, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [num_tokens, hidden], router_weight: [num_experts, hidden] (any weight format) ->
    `select_experts` of the router's logits (rounded to x's dtype, as a linear layer's)."""
    return select_experts(linear_ref(x, router_weight), top_k, renormalize)


def fused_moe_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, hidden]; topk_weights, topk_ids: [num_tokens, top_k] -> [num_tokens, hidden]
    in x's dtype.

    One expert at a time over the tokens routed to it, like transformers' eager loop; the
    per-token sum over its k experts is accumulated in float32.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        gate, up = F.linear(x[token], w_gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[expert])
        # index_put_ rather than index_add_: on CPU the latter costs milliseconds per call
        # at these sizes (measured 12 ms vs 3 us for [2, 64] on 2 busy cores).
        out.index_put_((token,), y.float() * topk_weights[token, slot, None], accumulate=True)
    return out.to(x.dtype)
