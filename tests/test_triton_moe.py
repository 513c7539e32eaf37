"""The fused MoE Triton kernel against its PyTorch reference, and the routing.

Runs under Triton's interpreter on CPU (tiny shapes: the interpreter runs a 16x16 dot in
Python); with TRITON_INTERPRET=0 and a GPU the same tests run compiled on CUDA.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import pytest
import torch

from wattserve.kernels.moe import fused_moe_ref, route_ref, select_experts
from wattserve.kernels.triton_interpreter import fix_loop_bounds
from wattserve.kernels.triton_moe import align_by_expert, fused_moe_triton
from wattserve.kernels.triton_moe_routing import fuses_routing, route_triton, select_experts_triton

ON_GPU = os.environ["TRITON_INTERPRET"] != "1"
if not ON_GPU:
    fix_loop_bounds()
DEVICE = "cuda" if ON_GPU else "cpu"
# hidden and intermediate not powers of two, so the column and K masks are exercised.
HIDDEN, INTER = 40, 24


def make_layer(num_experts, gen):
    w_gate_up = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w_down = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER**0.5
    return w_gate_up.to(DEVICE), w_down.to(DEVICE)


def skewed_logits(num_tokens, num_experts, gen, hot_experts):
    """Router logits that send most of the mass to `hot_experts`: uneven loads, and with
    few tokens and many experts, most experts get none."""
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, hot_experts] += 4.0
    return logits.to(DEVICE)


# Sorted into 16-row tiles, except (4, 2, 70): 64-row tiles (many tokens per expert), and
# (64, 8, 3), (64, 1, 1): one tile per assignment (decode: few tokens per expert).
@pytest.mark.parametrize("num_experts,top_k,num_tokens", [
    (4, 1, 5), (4, 2, 37), (4, 2, 70), (8, 2, 19), (16, 4, 23), (32, 6, 3), (64, 8, 3), (64, 1, 1),
])
def test_fused_moe_matches_reference(num_experts, top_k, num_tokens):
    gen = torch.Generator().manual_seed(num_experts * 100 + top_k)
    w_gate_up, w_down = make_layer(num_experts, gen)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(DEVICE)
    hot = list(range(min(top_k + 1, num_experts)))
    weights, ids = select_experts(skewed_logits(num_tokens, num_experts, gen, hot), top_k,
                                  renormalize=top_k > 1)
    loads = torch.bincount(ids.flatten().cpu(), minlength=num_experts)
    assert num_tokens < 3 or loads.max() > 2 * max(1, loads.min()), "want uneven loads"

    out = fused_moe_triton(x, w_gate_up, w_down, weights, ids)
    ref = fused_moe_ref(x, w_gate_up, w_down, weights, ids)
    assert out.shape == ref.shape == (num_tokens, HIDDEN) and out.dtype == x.dtype
    # fp32 throughout (ieee dots): only the summation order differs, so the error is a few
    # float32 ulps of the largest partial sums.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Again, bit for bit: the down kernel's in-kernel sum (one tile per assignment) leaves
    # its arrival counters at zero and adds in slot order.
    assert torch.equal(fused_moe_triton(x, w_gate_up, w_down, weights, ids), out)


def test_empty_batch_and_unrouted_experts():
    gen = torch.Generator().manual_seed(1)
    w_gate_up, w_down = make_layer(8, gen)
    empty = torch.empty(0, HIDDEN, device=DEVICE)
    no_routes = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    out = fused_moe_triton(empty, w_gate_up, w_down, no_routes.float(), no_routes)
    assert out.shape == (0, HIDDEN)
    # Every token on expert 5: the other seven are empty, and NaN weights there must not leak.
    w_gate_up[torch.arange(8) != 5] = float("nan")
    x = torch.randn(6, HIDDEN, generator=gen).to(DEVICE)
    ids = torch.full((6, 1), 5, device=DEVICE)
    weights = torch.ones(6, 1, device=DEVICE)
    torch.testing.assert_close(fused_moe_triton(x, w_gate_up, w_down, weights, ids),
                               fused_moe_ref(x, w_gate_up, w_down, weights, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_by_expert_places_every_assignment_once(block_m):
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 3]])
    n, num_experts = ids.numel(), 6
    sorted_ids, tile_expert = align_by_expert(ids, num_experts, block_m)
    assert tile_expert.numel() == -(-n // block_m) + min(num_experts, n)
    assert sorted_ids.numel() == tile_expert.numel() * block_m
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n)), "each assignment exactly once"
    tiles = sorted_ids.view(-1, block_m)
    for tile, expert in zip(tiles, tile_expert.tolist()):
        members = tile[tile < n]
        if expert < 0:
            assert members.numel() == 0, "tiles past the end hold no assignment"
        else:
            assert (ids.flatten()[members] == expert).all(), f"tile of expert {expert} mixes"
    # Experts 4 and 5 get nothing: no tile names them.
    assert not set(tile_expert.tolist()) & {4, 5}


@pytest.mark.parametrize("renormalize", [False, True])
def test_select_experts(renormalize):
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
    weights, ids = select_experts(logits, 2, renormalize)
    assert ids.tolist() == [[1, 2], [3, 0]]
    probs = torch.softmax(logits, -1)
    expected = torch.stack([probs[0, [1, 2]], probs[1, [3, 0]]])
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)
    assert weights.dtype == torch.float32


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (60, 4), (64, 8), (128, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_routing_kernel_matches_select_experts(num_experts, top_k, renormalize):
    gen = torch.Generator().manual_seed(num_experts + top_k)
    logits = (torch.randn(13, num_experts, generator=gen) * 3).to(DEVICE)
    weights, ids = select_experts_triton(logits, top_k, renormalize)
    ref_weights, ref_ids = select_experts(logits, top_k, renormalize)
    assert ids.dtype == ref_ids.dtype and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)  # random logits: no ties
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)
    weights, ids = select_experts_triton(logits[:0], top_k, renormalize)
    assert weights.shape == ids.shape == (0, top_k)


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("num_experts,top_k", [(60, 4), (128, 8)])
def test_router_matmul_and_top_k_in_one_kernel_match_the_reference(rows, num_experts, top_k):
    """Decode-sized routing: the router's logits split over expert tiles and 3 splits of K
    (hidden 2000: the last split short), added by the last program; the picks and weights of
    route_ref (fp16: the interpreter's dots take no bf16), twice (the counter back at 0)."""
    gen = torch.Generator().manual_seed(rows * 1000 + num_experts)
    hidden = 2000
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE, torch.float16)
    router = (torch.randn(num_experts, hidden, generator=gen) / hidden**0.5 * 3).to(DEVICE, torch.float16)
    assert fuses_routing(x, router)
    ref_weights, ref_ids = route_ref(x, router, top_k, renormalize=True)
    for _ in range(2):
        weights, ids = route_triton(x, router, top_k, renormalize=True)
        # The same experts; two with equal fp16 logits may come in either order (torch.topk
        # need not put the lower index first).
        assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
        # Both round float32 logits to fp16; a different summation order may flip a logit's
        # last bit (|logit| < 16: 2^-7), which moves the softmax weights by as much, relative.
        torch.testing.assert_close(weights, ref_weights, rtol=1e-2, atol=1e-3)
