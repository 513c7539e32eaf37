"""The int4 GEMV on packed bf16 pairs (kernels/triton_u4_gemv_bf16x2.py) and its bf16x2
arithmetic (kernels/triton_bf16x2.py): the interpreter twin of fma.rn.bf16x2 rounds as torch's
bf16 does, bit for bit; the GEMV is within its derived error bound of float64 on odd shapes,
every group size, with and without offsets. On a GPU (TRITON_INTERPRET=0), the PTX path
equals the twin bit for bit.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import pytest
import torch
import triton
import triton.language as tl

from wattserve.kernels import triton_quant_gemv
from wattserve.kernels.triton_bf16x2 import and_or, fma_bf16x2
from wattserve.kernels.triton_interpreter import fix_loop_bounds
from wattserve.kernels.triton_u4_gemv_bf16x2 import CENTER, bf16x2_fits, u4_gemv_bf16x2
from wattserve.kernels.weight_format import QuantizedWeight, dequantize, pack_u4, quantize_int4

ON_GPU = os.environ["TRITON_INTERPRET"] != "1"
if not ON_GPU:
    fix_loop_bounds()
DEVICE = "cuda" if ON_GPU else "cpu"
gpu_only = pytest.mark.skipif(not (ON_GPU and torch.cuda.is_available()),
                              reason="compares the PTX with its twin: needs a GPU (TRITON_INTERPRET=0)")


@triton.jit
def _bf16x2_ops_kernel(a_ptr, b_ptr, c_ptr, fma_ptr, and_or_ptr, n, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a, b, c = tl.load(a_ptr + i, mask=i < n), tl.load(b_ptr + i, mask=i < n), tl.load(c_ptr + i, mask=i < n)
    tl.store(fma_ptr + i, fma_bf16x2(a, b, c, EMULATE), mask=i < n)
    tl.store(and_or_ptr + i, and_or(a, b, c, EMULATE), mask=i < n)


def bf16x2_ops(a, b, c, emulate):
    """fma_bf16x2 and and_or over int32 words."""
    fma, bits = torch.empty_like(a), torch.empty_like(a)
    _bf16x2_ops_kernel[(1,)](a, b, c, fma, bits, a.numel(), BLOCK=triton.next_power_of_2(a.numel()), EMULATE=emulate)
    return fma, bits


def words(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two bf16 tensors as int32 words: low half first."""
    return torch.stack([low, high], -1).contiguous().view(torch.int32)[..., 0]


def operands(n=4096, seed=0):
    """bf16 words a, b, c as the GEMV has them (a: codes c - 8; b: x; c: running sums), with
    exact ties of a * b + c planted."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 8, (n, 2), generator=g).bfloat16()
    b = (torch.randn(n, 2, generator=g) * 4).bfloat16()
    c = (torch.randn(n, 2, generator=g) * 16).bfloat16()
    # Ties, each rounded to the even neighbour: 1 + 2^-8 (bf16's step above 1 is 2^-7) to 1,
    # 1 + 3 * 2^-8 up to 1 + 2^-6; below 1 the step halves: 1 - 2^-9 to 1, 1 - 3 * 2^-9 to 1 - 2^-7
    a[:8], b[:8] = 1, torch.tensor([2.0**-8, 3 * 2.0**-8, -(2.0**-9), -3 * 2.0**-9] * 2).bfloat16()[:, None]
    c[:8] = 1
    return tuple(words(t[:, 0], t[:, 1]) for t in (a, b, c))


def halves(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous().view(torch.bfloat16).reshape(*w.shape, 2)


def test_emulated_fma_rounds_once_to_nearest_even_as_torch():
    a, b, c = operands()
    fma, bits = bf16x2_ops(a, b, c, emulate=True)
    exact = halves(a).double() * halves(b).double() + halves(c).double()
    assert torch.equal(exact.float().double(), exact)  # float32 holds it: torch's cast rounds once
    expected = exact.float().bfloat16()
    assert torch.equal(halves(fma).view(torch.int16), expected.view(torch.int16))
    assert torch.equal(halves(fma)[:8, 0].float(), torch.tensor([1, 1 + 2**-6, 1, 1 - 2**-7] * 2))
    assert torch.equal(bits, (a & b) | c)


@gpu_only
def test_ptx_bf16x2_ops_equal_their_twins():
    """The GEMV's operands, and bf16 of any sign and mantissa within the twin's claim:
    exponents within +-6 (and randn's few more), so products and sums stay normal and exact
    in float64 before the one rounding."""
    g = torch.Generator().manual_seed(1)
    wide = [torch.randn(4096, 2, generator=g) * 2.0 ** torch.randint(-6, 7, (4096, 2), generator=g)
            for _ in range(3)]
    for a, b, c in (operands(), tuple(words(t[:, 0].bfloat16(), t[:, 1].bfloat16()) for t in wide)):
        a, b, c = (t.to(DEVICE) for t in (a, b, c))
        ptx, twin = bf16x2_ops(a, b, c, emulate=False), bf16x2_ops(a, b, c, emulate=True)
        assert torch.equal(ptx[0], twin[0]) and torch.equal(ptx[1], twin[1])


def bound(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The kernel's error bound before out's rounding (kernels/triton_u4_gemv_bf16x2.py's doc)."""
    k, center = w.in_features, CENTER.value
    codes = dequantize(QuantizedWeight("u4", w.codes, torch.ones_like(w.scales), w.group)).double()
    scales = w.scales.double().repeat_interleave(w.group, 1)
    shifts = center * scales
    if w.offsets is not None:
        shifts = shifts + w.offsets.double().repeat_interleave(w.group, 1)
    xa = x.double().abs()
    return ((5.1 + 1.02 * (k / 8 + 64) * 2**-16) * 2**-8 * (xa @ (scales * (codes - center)).abs().T)
            + (k + 64) * 2**-24 * (xa @ shifts.abs().T))


def weight(n, k, group, offsets, seed=0):
    """A u4 weight: RTN int4 (integer zero points), or random codes with float offsets (GGUF
    Q4_1-like), or none."""
    g = torch.Generator().manual_seed(seed)
    if offsets == "zero_points":
        return quantize_int4(torch.randn(n, k, generator=g), group)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    mins = -(torch.rand(n, k // group, generator=g) * 0.2).half() if offsets == "floats" else None
    return QuantizedWeight("u4", pack_u4(codes), scales, group, mins)


CASES = [  # (N, K, group, offsets, (BLOCK_N, BLOCK_K, warps)): odd N, K not a tile multiple
    (13, 320, 32, "zero_points", (8, 128, 4)),
    (13, 320, 64, "floats", (4, 256, 4)),
    (9, 640, 128, "zero_points", (8, 256, 2)),
    (9, 384, 128, None, (16, 512, 4)),
    (7, 136, 136, "floats", (4, 128, 4)),  # per-row scale over two tiles, the second short
    (7, 256, 256, None, (8, 2048, 4)),  # per-row, one masked tile
]


@pytest.mark.parametrize("n,k,group,offsets,config", CASES)
def test_gemv_within_its_bound_of_float64(n, k, group, offsets, config):
    w = weight(n, k, group, offsets).to(DEVICE)
    assert bf16x2_fits(w, config[1])
    x = (torch.randn(2, k, generator=torch.Generator().manual_seed(k)) * 3).bfloat16().float().to(DEVICE)
    x[1, ::7] = 0  # a row of zeros runs the masks' zeros too
    out = u4_gemv_bf16x2(x, w, config)  # float32 out: no rounding of its own
    exact = x.double() @ dequantize(w).double().T
    err, limit = (out.double() - exact).abs(), bound(x, w)
    assert (err <= limit).all(), f"worst error {(err / limit).max():.2f}x the bound"
    # The bound is not vacuous: bf16's roundings show (float32 products would be ~1e-5 of it).
    assert (err / limit).max() > 1e-3


def test_switch_routes_bf16_int4_through_the_variant(monkeypatch):
    w = weight(24, 256, 64, "zero_points").to(DEVICE)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)).bfloat16().to(DEVICE)
    monkeypatch.setattr(triton_quant_gemv, "U4_BF16X2", True)
    out = triton_quant_gemv.quant_gemv_triton(x, w)  # at the variant's default tile
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, u4_gemv_bf16x2(x, w, triton_quant_gemv.default_config(w)))
    exact = x.double() @ dequantize(w).double().T  # within the bound, plus out's bf16 rounding
    limit = bound(x, w)
    assert ((out.double() - exact).abs() <= limit + 2**-8 * (exact.abs() + limit)).all()


@gpu_only
@pytest.mark.parametrize("group", [32, 128, 4096])
def test_ptx_gemv_equals_its_twin(group):
    """The compiled kernel with PTX bf16x2 math against the same kernel with the twin's: bit
    for bit, at a served shape, at the variant's default tile and at the float32 kernel's."""
    w = quantize_int4(torch.randn(4096, 4096), group).to(DEVICE)
    x = torch.randn(1, 4096, device=DEVICE).bfloat16()
    for config in [(8, 2048, 2), (8, 2048, 4)]:  # x in registers only; x through shared memory
        assert torch.equal(u4_gemv_bf16x2(x, w, config, emulate=False), u4_gemv_bf16x2(x, w, config, emulate=True))
