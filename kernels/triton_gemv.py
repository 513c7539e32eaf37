"""Triton skinny matmul for decode: out = x @ weight.T (+ bias) for a few rows of x.
Reference: `torch.nn.functional.linear` (the CPU path's op).

A decode step multiplies 1 to a few token rows by every weight matrix, so it is a pure
weight stream: bytes, not FLOPs. cuBLAS picks, for Llama-3.1-8B's o_proj at one row, a
kernel well short of copy bandwidth, and split-K for qkv and down_proj with a separate reduce
kernel (`decode_matmuls`' `cublas_x_copy` in benchmarks/results/decode_profile_*.json). Here each program owns
BLOCK_N output columns and streams their weight rows over all of K, software-pipelined, with
the few x rows padded to the 16 rows of a tensor-core dot (the padding costs no memory
traffic). No split-K, so no second kernel and no atomics: one launch, one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the dot's padded row count; more rows go to cuBLAS

# (BLOCK_N, BLOCK_K, num_warps, num_stages), from `benchmarks/decode_profile.py --sweep` on
# an H100 (benchmarks/results/decode_profile_*.json).
DEFAULT_CONFIG = (32, 256, 4, 4)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    row_mask = rows[:, None] < M
    col_mask = cols[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
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
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask & (cols[None, :] < N))


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] = DEFAULT_CONFIG) -> torch.Tensor:
    """x: [M, K] with M <= MAX_ROWS, weight: [N, K] (rows contiguous), bias: [N] or None ->
    [M, N] in x's dtype, accumulated in float32."""
    m, k = x.shape
    n = weight.shape[0]
    assert x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    block_n, block_k, warps, stages = config
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps, num_stages=stages,
    )
    return out


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Ops entry point: decode-sized inputs (x: [<= MAX_ROWS, K], bf16/fp16) take the
    weight-streaming kernel, everything else cuBLAS. The choice uses x's shape only, so it is
    fixed inside a captured graph."""
    if x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1 \
            and weight.stride(-1) == 1:
        return gemv_triton(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
