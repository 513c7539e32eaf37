"""Programmatic dependent launch (kernels/pdl.py): a chain of PDL kernels in a CUDA graph gives
the bits of the same chain launched plainly, replay after replay on new inputs."""
from __future__ import annotations

import os

import pytest
import torch

from wattserve.kernels import pdl
from wattserve.kernels.weight_format import quantize_fp8

ON_SM90 = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
    and torch.cuda.get_device_capability() >= (9, 0)


def test_off_on_cpu():
    assert not pdl.pdl_enabled(torch.device("cpu"))


def _chain(x, w_norm, w_qkv, w_up, w_down, w_fp8):
    """norm -> GEMV -> split-K GEMV (few column tiles) -> activation -> add+norm -> fp8 GEMV:
    each kernel reads what the one before wrote."""
    from wattserve.kernels.triton_activation import silu_and_mul_triton
    from wattserve.kernels.triton_gemv import gemv_triton
    from wattserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
    from wattserve.kernels.triton_quant_gemv import quant_gemv_triton

    h = rms_norm_triton(x, w_norm, 1e-5)
    h = gemv_triton(h, w_qkv)
    up = gemv_triton(h, w_up)
    down = gemv_triton(silu_and_mul_triton(up), w_down)
    normed, residual = add_rms_norm_triton(down, h.clone(), w_norm, 1e-5)
    return quant_gemv_triton(normed, w_fp8), residual


@pytest.mark.skipif(not ON_SM90, reason="PDL needs an sm_90+ GPU")
def test_graph_of_pdl_kernels_matches_plain_launches(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.1

    # w_down's 1024 rows are 32 column tiles: the GEMV splits K (kernels/triton_gemv.split_k).
    weights = (rand(1024).abs() + 0.5, rand(1024, 1024), rand(2 * 2048, 1024), rand(1024, 2048))
    w_fp8 = quantize_fp8(rand(3072, 1024).float())
    inputs = [rand(1, 1024) for _ in range(6)]

    pdl.pdl_enabled.cache_clear()
    monkeypatch.setenv("WATTSERVE_PDL", "0")
    plain = [_chain(x, *weights, w_fp8) for x in inputs]
    pdl.pdl_enabled.cache_clear()
    monkeypatch.setenv("WATTSERVE_PDL", "1")
    assert pdl.pdl_enabled(torch.device("cuda"))

    x = inputs[0].clone()
    _chain(x, *weights, w_fp8)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, *weights, w_fp8)
    for i, new in enumerate(inputs):
        x.copy_(new)
        graph.replay()
        assert torch.equal(out[0], plain[i][0]) and torch.equal(out[1], plain[i][1]), i
    pdl.pdl_enabled.cache_clear()
