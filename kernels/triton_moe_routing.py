"""Triton MoE routing: softmax over the experts and top-k in one kernel, one program per
token; at decode sizes the router's matmul and the top-k in one kernel. References:
kernels/moe.py `select_experts`, `route_ref`.

The reference is four to five small launches (float, softmax, topk, sum, divide); in a
decode step of a 48-layer model those launches cost as much as the routed experts' weights
take to stream, so they are one here. At decode (a few tokens) the router's logits
([tokens, experts], e.g. 128) come from a skinny matmul whose programs split the experts
and K as kernels/triton_gemv.py does; the last of them to arrive adds the float32 partials
in split order, rounds the logits as the reference's linear does, and picks the experts
(kernels/triton_arrivals.py): one launch a layer instead of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled
from wattserve.kernels.triton_arrivals import arrival_counters, last_to_arrive
from wattserve.kernels.triton_gemv import DEFAULT_CONFIG, MAX_ROWS, split_k, split_partial


@triton.jit
def _softmax_topk(logits, rows_base, row_ok, num_experts, weights_ptr, ids_ptr,
                  TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """logits: [rows, BLOCK_E] float32 -> each row's top-k softmax weights and expert ids
    stored at rows_base * TOP_K + slot, for rows where row_ok."""
    cols = tl.arange(0, BLOCK_E)[None, :]
    logits = tl.where(cols < num_experts, logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = probs / tl.sum(probs, 1)[:, None]
    remaining = tl.where(cols < num_experts, probs, -1.0)  # padding is never picked
    slots = tl.arange(0, BLOCK_K)[None, :]
    weights = tl.zeros([logits.shape[0], BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([logits.shape[0], BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, 1)[:, None]
        pick = tl.min(tl.where(remaining == best, cols, BLOCK_E), 1)[:, None]  # lowest index of a tie
        weights = tl.where(slots == j, best, weights)
        ids = tl.where(slots == j, pick, ids)
        remaining = tl.where(cols == pick, -1.0, remaining)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]
    out = rows_base[:, None] * TOP_K + slots
    mask = row_ok[:, None] & (slots < TOP_K)
    tl.store(weights_ptr + out, weights, mask=mask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=mask)


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, stride_row, num_experts,
                         TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         RENORMALIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) + tl.zeros([1], dtype=tl.int64)
    cols = tl.arange(0, BLOCK_E)[None, :]
    logits = tl.load(logits_ptr + row[:, None] * stride_row + cols, mask=cols < num_experts, other=0.0)
    _softmax_topk(logits.to(tl.float32), row, row >= 0, num_experts, weights_ptr, ids_ptr,
                  TOP_K, BLOCK_E, BLOCK_K, RENORMALIZE)


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


@triton.jit
def _route_kernel(
    x_ptr, w_ptr, partial_ptr, arrived_ptr, weights_ptr, ids_ptr, M, num_experts, K, K_PER_SPLIT,
    stride_xm, stride_wn,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    # As the decode GEMV: the router's first tiles head for L2 while the previous kernel ends;
    # nothing is read or written before the wait (the counter included).
    acc, rows, cols = split_partial(x_ptr, w_ptr, M, num_experts, K, K_PER_SPLIT, stride_xm, stride_wn,
                                    BLOCK_M, BLOCK_N, BLOCK_K, False, PDL)
    split = tl.program_id(1)
    # partial: [splits, BLOCK_M, BLOCK_E] float32; rows below M written in full (zeros past E).
    row_ok = rows[:, None] < M
    tl.store(partial_ptr + (split * BLOCK_M + rows[:, None]) * BLOCK_E + cols[None, :], acc, mask=row_ok)
    if last_to_arrive(arrived_ptr, tl.num_programs(0) * SPLITS):
        e = tl.arange(0, BLOCK_E)
        logits = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        for s in range(SPLITS):
            logits += tl.load(partial_ptr + (s * BLOCK_M + rows[:, None]) * BLOCK_E + e[None, :], mask=row_ok,
                              other=0.0, cache_modifier=".cg")
        logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's linear rounds
        _softmax_topk(logits, rows, rows < M, num_experts, weights_ptr, ids_ptr,
                      TOP_K, BLOCK_E, BLOCK_TOP_K, RENORMALIZE)


def fuses_routing(x: torch.Tensor, router_weight) -> bool:
    """Whether `route_triton` runs as one kernel: decode-sized half-precision x (as
    kernels/triton_gemv.py takes) and a plain router weight of x's dtype."""
    return x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1 \
        and isinstance(router_weight, torch.Tensor) and router_weight.dtype == x.dtype \
        and router_weight.stride(-1) == 1


def route_triton(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [num_tokens, hidden] (`fuses_routing`), router_weight: [num_experts, hidden] ->
    select_experts(x @ router_weight.T): (weights [num_tokens, top_k] float32, expert ids
    [num_tokens, top_k] int64), in one launch."""
    assert fuses_routing(x, router_weight)
    (m, k), n = x.shape, router_weight.shape[0]
    assert router_weight.shape[1] == k and top_k <= n
    weights = torch.empty(m, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(m, top_k, dtype=torch.int64, device=x.device)
    if m == 0:
        return weights, ids
    block_n, block_k, warps, stages = DEFAULT_CONFIG
    splits, k_per_split = split_k(n, k, block_n, block_k, x.device)
    block_e = max(triton.next_power_of_2(n), block_n)
    partial = torch.empty(splits, MAX_ROWS, block_e, dtype=torch.float32, device=x.device)
    _route_kernel[(triton.cdiv(block_e, block_n), splits)](
        x, router_weight, partial, arrival_counters(x.device, 1), weights, ids, m, n, k, k_per_split,
        x.stride(0), router_weight.stride(0),
        TOP_K=top_k, BLOCK_E=block_e, BLOCK_TOP_K=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits, PDL=pdl_enabled(x.device),
        num_warps=warps, num_stages=stages, launch_pdl=pdl_enabled(x.device),
    )
    return weights, ids
