"""Packed bf16x2 arithmetic in Triton: an int32 word holds two bfloat16 (the low half first)
and one instruction works on both, as PTX's `fma.rn.bf16x2` (sm_80+) does. Triton has no
packed bf16 type, so the words travel as int32 and the math is inline PTX.

Inline PTX cannot run in Triton's interpreter, so each function has an EMULATE twin in plain
Triton (pass `interpreting()` of kernels/triton_interpreter.py as the kernel's constexpr):
float64 math, exact for these operands, rounded once to bf16, to nearest-even, as the PTX
does. Exact means: a * b of two bf16 has at most 16 significant bits, and a * b + c is exact
in float64's 53 while the two terms' exponents lie within 37 of each other (a product and a
sum of products of one weight word here lie far closer). Subnormal bf16 results (below
2^-126) are outside the twin's claim: it rounds them as normal numbers.
tests/test_quant_gemv_bf16x2.py checks the twin against torch's bf16 rounding bit for bit,
and on a GPU the PTX against the twin.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Low and high halves' bf16 1.0 (0x3F80), as the `b` of an fma that only adds.
ONE_X2 = tl.constexpr(0x3F803F80)
_LOW_BITS_F64 = tl.constexpr(45)  # float64's 52 fraction bits less bf16's 7
_JUST_UNDER_HALF_F64 = tl.constexpr((1 << 44) - 1)  # half a bf16 step in float64's bits, less 1
_KEEP_F64 = tl.constexpr(-(1 << 45))  # clears the low 45 bits


@triton.jit
def halves_f32(words):
    """The two bf16 of each int32 word as float32 (exact): (low half, high half)."""
    low = (words << 16).to(tl.float32, bitcast=True)
    high = (words & -65536).to(tl.float32, bitcast=True)  # -65536: 0xFFFF0000
    return low, high


@triton.jit
def _bf16_bits(v):
    """float64 v rounded to the nearest bf16, ties to even, as bf16 bits in the low 16 bits of
    an int32: add just under half a bf16 step (plus the kept last bit, for ties) to float64's
    bits, then clear the bits below bf16's; the carry, if any, moves up into the exponent."""
    bits = v.to(tl.int64, bitcast=True)
    bits += _JUST_UNDER_HALF_F64 + ((bits >> _LOW_BITS_F64) & 1)
    bits = bits & _KEEP_F64
    rounded = bits.to(tl.float64, bitcast=True).to(tl.float32)  # exact: 8 significant bits
    return (rounded.to(tl.int32, bitcast=True) >> 16) & 0xFFFF


@triton.jit
def fma_bf16x2(a, b, c, EMULATE: tl.constexpr):
    """a * b + c on both bf16 halves of int32 words, each half rounded once (PTX fma.rn.bf16x2)."""
    if EMULATE:
        a, b, c = tl.cast(a, tl.int32), tl.cast(b, tl.int32), tl.cast(c, tl.int32)  # constants too
        a_low, a_high = halves_f32(a)
        b_low, b_high = halves_f32(b)
        c_low, c_high = halves_f32(c)
        low = _bf16_bits(a_low.to(tl.float64) * b_low.to(tl.float64) + c_low.to(tl.float64))
        high = _bf16_bits(a_high.to(tl.float64) * b_high.to(tl.float64) + c_high.to(tl.float64))
        return low | (high << 16)
    else:
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def and_or(a, mask, bits, EMULATE: tl.constexpr):
    """(a & mask) | bits on int32 words as one LOP3: written as two operations, ptxas keeps
    both constants as immediates and spends two instructions (a LOP3 takes one immediate)."""
    if EMULATE:
        return (a & mask) | bits
    else:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [a, mask, bits],
                                         dtype=tl.int32, is_pure=True, pack=1)
