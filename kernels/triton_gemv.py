"""Triton skinny matmul for decode: out = x @ weight.T (+ bias) for a few rows of x.
Reference: `torch.nn.functional.linear` (the CPU path's op).

A decode step multiplies 1 to a few token rows by every weight matrix, so it is a pure
weight stream: bytes, not FLOPs. cuBLAS picks, for Llama-3.1-8B's o_proj at one row, a
kernel well short of copy bandwidth, and split-K for qkv and down_proj with a separate reduce
kernel (`decode_matmuls`' `cublas_x_copy` in benchmarks/results/decode_profile_*.json). Here each program owns
BLOCK_N output columns and streams their weight rows over all of K, software-pipelined, with
the few x rows padded to the 16 rows of a tensor-core dot (the padding costs no memory
traffic). A matrix of too few column tiles to fill the SMs is also split along K, in the same
launch (`split_k`).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, prefetch_rows_l2, wait_for_inputs
from wattserve.kernels.triton_arrivals import arrival_counters, last_to_arrive

MAX_ROWS = 16  # the dot's padded row count; more rows go to cuBLAS

# (BLOCK_N, BLOCK_K, num_warps, num_stages), from `benchmarks/decode_profile.py --sweep` on
# an H100 (benchmarks/results/decode_profile_*.json).
DEFAULT_CONFIG = (32, 256, 4, 4)
SPLIT_K_PROGRAMS_PER_SM = 2  # the occupancy a split matrix is cut for
PREFETCH_TILES = tl.constexpr(2)  # weight tiles a program asks L2 for before its inputs are ready (kernels/pdl.py)


@triton.jit
def split_partial(x_ptr, w_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    """This program's tile of x @ w.T over its split of K: (acc [BLOCK_M, BLOCK_N] float32,
    rows, cols); columns tile program_id(0), splits program_id(1). Under PDL (kernels/pdl.py)
    the weights' first tiles head for L2 before the wait, nothing else is read before it."""
    pid, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_start = split * K_PER_SPLIT
    prefetch_rows_l2(w_ptr + tl.minimum(cols, N - 1).to(tl.int64) * stride_wn + k_start, K - k_start,
                     PREFETCH_TILES * BLOCK_K * w_ptr.dtype.element_ty.primitive_bitwidth // 8, PDL)
    wait_for_inputs(PDL)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + k_start + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + k_start + ks[None, :]
    row_mask = rows[:, None] < M
    col_mask = cols[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=col_mask, other=0.0)
            x = tl.load(x_ptrs, mask=row_mask, other=0.0)
        else:
            k_mask = (k0 + ks)[None, :] < K
            w = tl.load(w_ptrs, mask=col_mask & k_mask, other=0.0)
            x = tl.load(x_ptrs, mask=row_mask & k_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc, rows, cols


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, arrived_ptr, M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    acc, rows, cols = split_partial(x_ptr, w_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn,
                                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PDL)
    pid, split = tl.program_id(0), tl.program_id(1)
    row_mask = rows[:, None] < M
    out_mask = row_mask & (cols[None, :] < N)
    if SPLIT_K > 1:
        # Serial split-K in one launch: each split leaves its float32 partial, and the tile's
        # last split to arrive adds them all in split order (the same sum whatever the
        # arrival order) and writes the output (kernels/triton_arrivals.py). No second
        # kernel, no output atomics.
        partials = partial_ptr + (rows[:, None] * SPLIT_K) * N + cols[None, :]
        tl.store(partials + split * N, acc, mask=out_mask)
        if not last_to_arrive(arrived_ptr + pid, SPLIT_K):
            return
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(partials + s * N, mask=out_mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def split_k(n: int, k: int, block_n: int, block_k: int, device: torch.device,
            splits: int | None = None) -> tuple[int, int]:
    """(splits, columns of K per split) for a matrix of too few column tiles to fill the SMs
    (Qwen3-30B-A3B's o_proj: 64 tiles of 32 rows on the H200's 132 SMs; benchmarks/results/
    moe_*.json, decode_kernels), at least two K blocks each, whole K blocks per split;
    (1, K rounded up to a block) for matrices that fill them. `splits` given: that many
    instead (benchmarks/moe_bench.py times the choices), fewer where whole blocks leave one out."""
    if splits is None:
        sms = _sm_count(device)
        tiles = triton.cdiv(n, block_n)
        splits = 1 if tiles >= sms else \
            max(1, min(triton.cdiv(SPLIT_K_PROGRAMS_PER_SM * sms, tiles), k // (2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return triton.cdiv(k, k_per_split), k_per_split  # whole blocks may leave one split fewer


# Split-K partials per (device, N, splits): float32 [MAX_ROWS, splits, N]. Allocated on first
# use (the decode graphs' warm-up runs before their capture), so captured graphs keep reading
# the same.
_partials: dict[tuple, torch.Tensor] = {}


def _split_partials(device: torch.device, n: int, splits: int) -> torch.Tensor:
    key = (device, n, splits)
    if key not in _partials:
        _partials[key] = torch.empty(MAX_ROWS * splits * n, device=device, dtype=torch.float32)
    return _partials[key]


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] = DEFAULT_CONFIG, splits: int | None = None) -> torch.Tensor:
    """x: [M, K] with M <= MAX_ROWS, weight: [N, K] (rows contiguous), bias: [N] or None ->
    [M, N] in x's dtype, accumulated in float32. splits: K splits (default `split_k`'s)."""
    m, k = x.shape
    n = weight.shape[0]
    assert x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    block_n, block_k, warps, stages = config
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    tiles = triton.cdiv(n, block_n)
    splits, k_per_split = split_k(n, k, block_n, block_k, x.device, splits)
    partials, arrived = (_split_partials(x.device, n, splits), arrival_counters(x.device, tiles)) if splits > 1 \
        else (out, out)
    _gemv_kernel[(tiles, splits)](
        x, weight, bias if bias is not None else weight, out, partials, arrived, m, n, k, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, SPLIT_K=splits, PDL=pdl_enabled(x.device), num_warps=warps, num_stages=stages,
        launch_pdl=pdl_enabled(x.device),
    )
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests): split as a 132-SM H200 would
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Ops entry point: decode-sized inputs (x: [<= MAX_ROWS, K], bf16/fp16) take the
    weight-streaming kernel, everything else cuBLAS. The choice uses x's shape only, so it is
    fixed inside a captured graph."""
    if x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1 \
            and weight.stride(-1) == 1:
        return gemv_triton(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
