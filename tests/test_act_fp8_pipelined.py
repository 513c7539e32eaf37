"""The pipelined act-and-mul + per-token fp8 kernel (triton_activation.ACT_FP8_PIPELINED)
against the reference (the activation, then weight_format.quantize_per_token_fp8) and the
one-row kernel; and its quotient by the row's reciprocal against IEEE division over every
value a bf16 row can hold (the interpreter's FMA rounds twice, so only this check covers the
compiled arithmetic).

Runs under Triton's interpreter on CPU by default; TRITON_INTERPRET=0 runs it on a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from wattserve.kernels.triton_activation import (  # noqa: E402
    act_and_mul_fp8_triton, gelu_tanh_and_mul_triton, silu_and_mul_triton,
)
from wattserve.kernels.triton_interpreter import fix_loop_bounds  # noqa: E402
from wattserve.kernels.weight_format import FP8_MAX, quantize_per_token_fp8  # noqa: E402

ON_GPU = os.environ["TRITON_INTERPRET"] != "1"
if not ON_GPU:
    fix_loop_bounds()
DEVICE = "cuda" if ON_GPU else "cpu"
F32, F64 = np.float32, np.float64


def gate_up_rows(rows: int, inter: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * 3
    gate_up.view(-1)[::101] *= 40  # outliers: the scale comes from a few values
    gate_up[2] = 0  # a zero row: the scale's floor
    gate_up[4, :inter] = -0.0  # silu(-0) * up = -0 for up > 0: the codes keep the sign
    gate_up[4, inter:] = gate_up[4, inter:].abs() + 1
    # Where the compiled lean activation drops Triton's range guards (1 + exp(-gate) past
    # 2^126: silu's bf16 gates -87.5 to -88.5; gelu_tanh's border, -10 and -10.0625), a row of
    # only such gates (the scale's floor), and bf16 subnormal gates.
    gate_up[5, :inter:2] = -88.0
    gate_up[6, :inter] = torch.tensor([-87.5, -88.0, -88.5]).repeat(inter)[:inter]
    gate_up[7, :inter:2] = torch.tensor([-10.0, -10.0625]).repeat(inter)[: (inter + 1) // 2]
    gate_up[8, :inter:3] = 1e-39 * torch.sign(gate_up[8, :inter:3])
    return gate_up.to(DEVICE, dtype)


def assert_same_fp8(got, want):
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gelu_tanh", [False, True])
@pytest.mark.parametrize("inter", [700, 1531])  # masked tails; odd
def test_pipelined_kernel_gives_the_references_codes_and_scales(dtype, gelu_tanh, inter):
    gate_up = gate_up_rows(11, inter, dtype, seed=inter)  # 11 rows over 4 programs: 2 or 3 rows each
    got = act_and_mul_fp8_triton(gate_up, gelu_tanh, pipelined=True)
    # The activation as the Triton kernels round it (torch's F.silu differs in a last bit
    # now and then), then the reference's quantization.
    act = (gelu_tanh_and_mul_triton if gelu_tanh else silu_and_mul_triton)(gate_up)
    assert_same_fp8(got, quantize_per_token_fp8(act))
    assert_same_fp8(got, act_and_mul_fp8_triton(gate_up, gelu_tanh, pipelined=False))
    assert got[1][2].item() == np.float32(1e-12) and not got[0][2].view(torch.uint8).any()  # zero row
    assert (got[0][4].view(torch.uint8) == 0x80).all()  # -0 activations: code -0


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels: the FMA quotient and the cp.async pipeline")
@pytest.mark.parametrize("gelu_tanh", [False, True])
def test_compiled_pipelined_kernel_equals_the_one_row_kernel_bit_for_bit(gelu_tanh):
    gate_up = gate_up_rows(1000, 14336, torch.bfloat16, seed=5)  # Llama-3.1-8B's MLP: 7-8 rows a program
    got = act_and_mul_fp8_triton(gate_up, gelu_tanh, pipelined=True)
    assert_same_fp8(got, act_and_mul_fp8_triton(gate_up, gelu_tanh, pipelined=False))
    act = (gelu_tanh_and_mul_triton if gelu_tanh else silu_and_mul_triton)(gate_up)
    assert_same_fp8(got, quantize_per_token_fp8(act))  # torch's division and rounding


def fp32_round_once(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """RN_float32(q + p) of float64 q and p (float32 values and exact float32 products),
    rounded once as an FMA rounds: float64's sum s and its error e (TwoSum) are the exact
    sum; float32(s) is its rounding unless s lies exactly midway between two float32 values
    (|e| is far below their spacing), where e's sign decides."""
    s = q + p
    bp = s - q
    e = (q - (s - bp)) + (p - bp)
    t = s.astype(F32)
    lo = np.where(t.astype(F64) <= s, t, np.nextafter(t, F32(-np.inf)))
    hi = np.where(t.astype(F64) >= s, t, np.nextafter(t, F32(np.inf)))
    midway = (lo != hi) & (s == (lo.astype(F64) + hi.astype(F64)) / 2)
    return np.where(midway & (e > 0), hi, np.where(midway & (e < 0), lo, t))


def quotient_by_reciprocal(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """triton_token_quant.quotient_by_reciprocal as the GPU computes it (float32 multiply,
    FMAs rounded once), from reciprocal = RN(1 / scale)."""
    reciprocal = F32(1) / scale
    q = x * reciprocal
    # x - scale * q: exact in float64 (the product's 48 bits; Sterbenz), rounded once.
    residual = (x.astype(F64) - scale.astype(F64) * q.astype(F64)).astype(F32)
    q = fp32_round_once(q.astype(F64), residual.astype(F64) * reciprocal.astype(F64))
    sign = x.view(np.uint32) & np.uint32(0x80000000)
    return (q.view(np.uint32) | sign).view(F32)


def bf16_values(lo_exp: int, hi_exp: int) -> np.ndarray:
    """Every positive normal bf16 value with exponent in [lo_exp, hi_exp], as float32."""
    exps = np.arange(lo_exp, hi_exp + 1)
    mantissas = np.arange(128)
    bits = ((exps[:, None] + 127) << 23) | (mantissas[None, :] << 16)
    return bits.astype(np.uint32).ravel().view(F32)


def test_quotient_by_reciprocal_is_ieee_division_for_every_bf16_row():
    """Every pair (x, the row's largest magnitude) of bf16 values, x at most 24 binades below
    (further down x / scale < 2**-14 and both quotients encode to a signed zero): the quotient
    equals float32 division bit for bit. Scaling both by a power of 2 scales both sides, so one
    binade of the largest magnitude covers all but the scale's 1e-12 floor, checked apart."""
    amax = bf16_values(0, 0)  # 128 significands
    scale = np.maximum(amax / F32(FP8_MAX), F32(1e-12))
    x = np.concatenate([bf16_values(-24, 0), -bf16_values(-24, 0)])
    xs, ss = np.broadcast_arrays(x[:, None], scale[None, :])
    keep = np.abs(xs) <= np.broadcast_to(amax[None, :], xs.shape)
    xs, ss = xs[keep], ss[keep]
    assert np.array_equal(quotient_by_reciprocal(xs, ss).view(np.uint32), (xs / ss).view(np.uint32))
    # The floor: rows whose largest magnitude is under 448e-12, every bf16 value down to 2**-60.
    tiny = bf16_values(-60, -32)
    tiny = np.concatenate([tiny, -tiny])
    floor = np.full_like(tiny, F32(1e-12))
    assert np.array_equal(quotient_by_reciprocal(tiny, floor).view(np.uint32), (tiny / floor).view(np.uint32))
    # Zeros keep their sign; bf16 subnormals (and anything under 2**-126) give quotients far
    # below fp8's smallest step, 2**-9, with x's sign: both encode to the same signed zero.
    small = np.arange(128, dtype=np.uint32) << 16
    small = np.concatenate([small, small | np.uint32(0x80000000)]).view(F32)
    for s in (F32(1e-12), scale.min(), scale.max()):
        got, want = quotient_by_reciprocal(small, np.full_like(small, s)), small / s
        assert np.array_equal(np.signbit(got), np.signbit(want)) and (np.abs(got) < 2.0**-12).all()
        assert np.array_equal(got[want == 0].view(np.uint32), want[want == 0].view(np.uint32))


@pytest.mark.parametrize("gelu_tanh", [False, True])
def test_lean_activation_equals_the_default_one_but_for_signed_zeros_of_tiny_values(gelu_tanh):
    """triton_activation._sigmoid_times_lean against Triton's exp and '/' as sm_90 runs them
    (MUFU.EX2 with its guard for arguments under -126; div.full: MUFU.RCP and a multiply,
    scaled by 1/4 for divisors past 2^126), MUFU modeled as a function both share, over every
    bf16 gate: the same float32 bits, or where div.full scales, a default result under 1e-36
    and a lean zero of its sign."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        g = np.arange(1 << 16, dtype=np.uint32) << 16
        g = g.view(F32)[np.isfinite(g.view(F32))]
        log2e = F32(1.4426950216293334961)
        if gelu_tanh:
            z = F32(0.7978845608028654) * (g + F32(0.044715) * g * g * g)
            default_arg, lean_arg = (F32(-2) * z) * log2e, z * (F32(-2) * log2e)
        else:
            default_arg, lean_arg = (F32(0) - g) * log2e, g * -log2e
        assert np.array_equal(default_arg, lean_arg)  # as values: silu's gate +0 gives +0 and -0
        tiny = np.finfo(F32).tiny
        ex2 = np.exp2(default_arg).astype(F32)
        d_default, d_lean = F32(1) + ex2, F32(1) + np.where(ex2 < tiny, F32(0), ex2)  # ftz
        assert np.array_equal(d_default, d_lean)
        scaled = d_default > F32(2.0**126)
        rcp = F32(1) / d_default
        default = np.where(scaled, (g * F32(0.25)) * (F32(1) / (d_default * F32(0.25))), g * rcp)
        lean = g * np.where(rcp < tiny, F32(0), rcp)
    same = default.view(np.uint32) == lean.view(np.uint32)
    assert same[~scaled].all()
    assert (np.abs(default[~same]) < 1e-36).all() and (lean[~same] == 0).all()
    assert np.array_equal(np.signbit(default[~same]), np.signbit(lean[~same]))
    # silu's gates -87.5 to -88.5 reach the scaling with a finite divisor; gelu's none
    assert (scaled & np.isfinite(d_default)).any() != gelu_tanh
