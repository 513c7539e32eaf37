"""Triton fused MoE: tokens sorted by expert, a grouped GEMM over the stacked expert weights.
Reference: kernels/moe.py `fused_moe_ref`.

Each (token, expert) pair of the top-k routing is an "assignment". `align_by_expert` sorts
the assignments by expert and pads each expert's run to a multiple of BLOCK_M, so that every
BLOCK_M-row tile of the sorted list belongs to one expert. Then two kernels walk the tiles:

  1. gate_up: rows of x gathered by the tile's assignments times the expert's gate and up
     rows, SwiGLU applied in registers -> act [assignments, intermediate];
  2. down: act times the expert's down projection, scaled by the routing weight ->
     partial [assignments, hidden] in float32;
  3. sum: each token's k partial rows added in slot order in float32 and rounded once to
     x's dtype (no float atomics, so the result does not depend on the schedule; one launch
     where torch needs a sum and a cast). With one tile per assignment (decode) the down
     kernel's last program of a token's k does this sum itself (`_sum_token_if_last`):
     one launch fewer per layer, 48 per Qwen3-30B-A3B decode step, and all the down
     kernel's programs still stream weights side by side (a program per token looping over
     its k experts would leave the H200's SMs half empty at batch 1).

Everything is sized by the token count alone (at most cdiv(T*k, BLOCK_M) + min(E, T*k)
tiles; the unused ones exit at once), with no host synchronisation, so a decode step's
graph captures it. Each expert's weights are read once per tile.

With few assignments per expert (decode: T*k <= E / 2) the sort is skipped: each assignment
is its own tile, so the step adds no sorting kernels (a dozen small launches per layer, as
much time as the weights' stream at batch 1), at the price of reading an expert twice when
two tokens pick it (expected share of such pairs: about T*k / 2E <= 1/4). Hidden and
intermediate sizes are compile-time constants: fixed per model, they give one compile per
layer shape and let the K loops unroll without a remainder check when they divide evenly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs
from wattserve.kernels.triton_arrivals import arrival_counters, last_to_arrive


@triton.jit
def _tile_rows(tile, sorted_ids_ptr, tile_expert_ptr, num_assignments,
               BLOCK_M: tl.constexpr, PER_ASSIGNMENT: tl.constexpr):
    """The tile's expert (-1: unused tile) and its BLOCK_M assignment ids, where
    num_assignments marks an empty row."""
    rows = tl.arange(0, BLOCK_M)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int32)
    if PER_ASSIGNMENT:
        ids = tl.where(rows == 0, tile, num_assignments)
    else:
        ids = tl.load(sorted_ids_ptr + tile * BLOCK_M + rows)
    return expert, ids


@triton.jit
def _gate_up_silu_kernel(
    x_ptr, w_ptr, act_ptr, sorted_ids_ptr, tile_expert_ptr,
    num_assignments, top_k, stride_xm, stride_we, stride_wn, stride_am,
    HIDDEN: tl.constexpr, INTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert, ids = _tile_rows(tile, sorted_ids_ptr, tile_expert_ptr, num_assignments, BLOCK_M, PER_ASSIGNMENT)
    if expert < 0:
        return
    valid = ids < num_assignments
    tokens = ids // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None]
    gate_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn
    up_ptrs = w_base + (cols[None, :] + INTER).to(tl.int64) * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k_ok = (k0 + ks) < HIDDEN
        x = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        gate = tl.dot(x, wg, gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, wu, up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    # Rounded to the activation dtype after the projection, as the reference's linear does.
    gate = gate.to(act_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    out = act_ptr + ids[:, None].to(tl.int64) * stride_am + cols[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, weights_ptr, partial_ptr, out_ptr, arrived_ptr, sorted_ids_ptr, tile_expert_ptr,
    num_assignments, stride_am, stride_we, stride_wn, stride_pm, stride_om,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr, SUM_HERE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert, ids = _tile_rows(tile, sorted_ids_ptr, tile_expert_ptr, num_assignments, BLOCK_M, PER_ASSIGNMENT)
    if expert < 0:
        return
    valid = ids < num_assignments
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + ids[:, None].to(tl.int64) * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn \
        + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k_ok = (k0 + ks) < INTER
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    # Rounded to the activation dtype after the projection, as the reference's linear does.
    acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
    routing = tl.load(weights_ptr + ids, mask=valid, other=0.0)
    partial = partial_ptr + ids[:, None].to(tl.int64) * stride_pm + cols[None, :]
    tl.store(partial, acc * routing[:, None], mask=valid[:, None] & col_ok[None, :])
    if SUM_HERE:
        _sum_token_if_last(partial_ptr, out_ptr, arrived_ptr, tile // TOP_K, pid_n, cols, col_ok,
                           stride_pm, stride_om, TOP_K, BLOCK_N)


@triton.jit
def _sum_token_if_last(partial_ptr, out_ptr, arrived_ptr, token, pid_n, cols, col_ok,
                       stride_pm, stride_om, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile per assignment: the last of the token's TOP_K programs on these columns to
    arrive adds the k partials in slot order, as _sum_assignments_kernel does (same result
    whatever the arrival order; kernels/triton_arrivals.py), and writes the token's output."""
    if last_to_arrive(arrived_ptr + token * tl.num_programs(1) + pid_n, TOP_K):
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            total += tl.load(partial_ptr + (token * TOP_K + j).to(tl.int64) * stride_pm + cols, mask=col_ok,
                             other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + token.to(tl.int64) * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _sum_assignments_kernel(partial_ptr, out_ptr, HIDDEN: tl.constexpr, TOP_K: tl.constexpr,
                            BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(partial_ptr + (token * TOP_K + j) * HIDDEN + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * HIDDEN + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids: [num_tokens, top_k] -> (sorted_ids [num_tiles * block_m] int32,
    tile_expert [num_tiles] int32).

    sorted_ids lists assignment indices (token * top_k + slot) grouped by expert, each
    expert's run padded with num_tokens * top_k (no assignment) to whole tiles; tile_expert
    is each tile's expert, -1 for tiles past the last one in use. num_tiles depends only on
    the shape of topk_ids.
    """
    n = topk_ids.numel()
    device = topk_ids.device
    num_tiles = triton.cdiv(n, block_m) + min(num_experts, n)
    flat = topk_ids.reshape(-1)
    experts, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    # An assignment's place: its expert's padded start plus its rank within the expert.
    rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[experts]
    dest = (padded_end - padded)[experts] + rank
    sorted_ids = torch.full((num_tiles * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    tile_start = torch.arange(num_tiles, device=device) * block_m
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return sorted_ids, tile_expert


def _tiling(num_assignments: int, num_experts: int) -> tuple[bool, int]:
    """(one tile per assignment?, BLOCK_M). BLOCK_M 16 (a tensor-core dot's minimum) while
    experts see few tokens each and tiles are mostly padding; 64 once FLOPs matter."""
    if num_assignments <= num_experts // 2:
        return True, 16
    return False, 16 if num_assignments < 32 * num_experts else 64


def _launch_config(block_m: int, k_dim: int, n_dim: int) -> dict:
    """Block sizes, warps and stages. Few rows: a weight stream like kernels/triton_gemv.py
    (narrow column tiles so that enough programs run to fill the SMs, long K steps); many
    rows: square 64 tiles, the usual grouped-GEMM shape."""
    if block_m == 16:
        block_n, block_k = 32, 256
    else:
        block_n, block_k = 64, 64
    return dict(BLOCK_M=block_m, BLOCK_N=min(block_n, max(16, triton.next_power_of_2(n_dim))),
                BLOCK_K=min(block_k, max(16, triton.next_power_of_2(k_dim))), num_warps=4, num_stages=3)


def fused_moe_triton(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     configs: tuple[dict, dict] | None = None) -> torch.Tensor:
    """x: [num_tokens, hidden]; w_gate_up: [E, 2 * inter, hidden]; w_down: [E, hidden, inter];
    topk_weights (float32), topk_ids: [num_tokens, top_k] -> [num_tokens, hidden] in x's dtype.
    configs: the two kernels' launch configs (as _launch_config returns; BLOCK_M included),
    for benchmarks/moe_bench.py's sweep; default by the token count."""
    num_tokens, hidden = x.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    top_k = topk_ids.shape[1]
    assert w_gate_up.shape == (num_experts, 2 * inter, hidden) and w_down.shape[1] == hidden
    assert x.stride(-1) == 1 and w_gate_up.stride(-1) == 1 and w_down.stride(-1) == 1
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    per_assignment, block_m = _tiling(n, num_experts)
    if per_assignment:  # tile i is assignment i, of expert topk_ids.flat[i]; no list needed
        tile_expert = topk_ids.reshape(-1)
        sorted_ids = tile_expert
    else:
        sorted_ids, tile_expert = align_by_expert(topk_ids, num_experts, block_m)
    # fp32 models get fp32 dots (a tf32 dot would lose 3 decimal digits against the reference).
    common = dict(DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  PER_ASSIGNMENT=per_assignment, HIDDEN=hidden, INTER=inter,
                  PDL=pdl_enabled(x.device), launch_pdl=pdl_enabled(x.device))
    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    gate_up_config, down_config = configs or (_launch_config(block_m, hidden, inter),
                                              _launch_config(block_m, inter, hidden))
    assert gate_up_config["BLOCK_M"] == down_config["BLOCK_M"] == block_m
    _gate_up_silu_kernel[(tile_expert.numel(), triton.cdiv(inter, gate_up_config["BLOCK_N"]))](
        x, w_gate_up, act, sorted_ids, tile_expert, n, top_k,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0), **common, **gate_up_config,
    )
    partial = torch.empty(n, hidden, dtype=torch.float32, device=x.device)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    # One tile per assignment: the down kernel adds each token's k partials itself.
    col_tiles = triton.cdiv(hidden, down_config["BLOCK_N"])
    arrived = arrival_counters(x.device, num_tokens * col_tiles) if per_assignment else partial
    _down_kernel[(tile_expert.numel(), col_tiles)](
        act, w_down, topk_weights.reshape(-1).float(), partial, out, arrived, sorted_ids, tile_expert,
        n, act.stride(0), w_down.stride(0), w_down.stride(1), partial.stride(0), out.stride(0),
        TOP_K=top_k, SUM_HERE=per_assignment, **common, **down_config,
    )
    if not per_assignment:
        block = min(1024, triton.next_power_of_2(hidden))
        _sum_assignments_kernel[(num_tokens, triton.cdiv(hidden, block))](
            partial, out, HIDDEN=hidden, TOP_K=top_k, BLOCK=block, num_warps=4)
    return out
