"""Triton MoE routing: softmax over the experts and top-k in one kernel, one program per
token. Reference: kernels/moe.py `select_experts`.

The reference is four to five small launches (float, softmax, topk, sum, divide); in a
decode step of a 48-layer model those launches cost as much as the routed experts' weights
take to stream, so they are one here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, stride_row, num_experts,
                         TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         RENORMALIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + row * stride_row + cols, mask=cols < num_experts,
                     other=float("-inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, 0))
    probs = probs / tl.sum(probs, 0)
    remaining = tl.where(cols < num_experts, probs, -1.0)  # padding is never picked
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, 0)
        pick = tl.min(tl.where(remaining == best, cols, BLOCK_E), 0)  # lowest index of a tie
        weights = tl.where(slots == j, best, weights)
        ids = tl.where(slots == j, pick, ids)
        remaining = tl.where(cols == pick, -1.0, remaining)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 0)
    out = row * TOP_K + slots
    tl.store(weights_ptr + out, weights, mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=slots < TOP_K)


def select_experts_triton(router_logits: torch.Tensor, top_k: int,
                          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [num_tokens, num_experts] -> (weights [num_tokens, top_k] float32,
    expert ids [num_tokens, top_k] int64), in descending weight order."""
    num_tokens, num_experts = router_logits.shape
    assert router_logits.stride(-1) == 1 and top_k <= num_experts
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        _topk_softmax_kernel[(num_tokens,)](
            router_logits, weights, ids, router_logits.stride(0), num_experts, TOP_K=top_k,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize, num_warps=1 if num_experts <= 128 else 4,
        )
    return weights, ids
