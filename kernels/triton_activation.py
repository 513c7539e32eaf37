"""Triton gated activations: silu(gate) * up and gelu_tanh(gate) * up. References:
activation.silu_and_mul_ref, activation.gelu_tanh_and_mul_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from wattserve.kernels.pdl import pdl_enabled, wait_for_inputs
from wattserve.kernels.triton_interpreter import interpreting
from wattserve.kernels.triton_kv_write import fp8_codes, native_fp8
from wattserve.kernels.triton_token_quant import (
    MAX_ONE_PASS, empty_fp8_rows, quantize_row, quotient_by_reciprocal, row_scale, row_warps,
)
from wattserve.kernels.weight_format import FP8_MAX

# act_and_mul_fp8_triton's kernel: off, the one-row program (`_act_and_mul_fp8_kernel`), as
# measured on the H200 at 0.49 of the copy bandwidth (4,096 x 14,336 bf16: 4.64 ms over a
# prefill's 32 layers, benchmarks/results/weight_quant_NVIDIA_H200.json). On, the persistent
# program that loads its next rows while quantizing this one, in fewer instructions a value
# (`_act_and_mul_fp8_pipelined_kernel`): never run on a GPU yet, so off until
# tests/test_act_fp8_pipelined.py passes compiled and benchmarks/act_fp8_bench.py measures
# it against the one-row program and the copy.
ACT_FP8_PIPELINED = False
# The pipelined kernel's launch: warps a program and pipeline stages (rows in shared memory,
# 64 KiB each at 14,336 columns: 3 stages leave one program an SM in the H200's 227 KiB).
# sm_90 builds at 3 stages (silu, bf16): 16 warps 89 registers, ~720 instructions a thread a
# row (16 warps x 720 = 11.5k a row an SM, 1.45 us of issue at 1.98 GHz against the row's
# 2.27 us of memory time at 4.17 TB/s; the one-row kernel: 16 x 1,108, 2.24 us); 32 warps 48
# registers, 32 x 460. act_fp8_bench.py times a grid.
PIPELINED_WARPS = 16
PIPELINED_STAGES = 3
SHARED_BYTES = 227 * 1024  # an sm_90 program's most (sm_80's: 163 KiB)


@triton.jit
def _act_times_up(g, u, GELU_TANH: tl.constexpr, LEAN: tl.constexpr = False):
    """act(g) * u in g's dtype, rounded as the reference's two ops round. LEAN (compiled
    only): the activation by `_sigmoid_times_lean`, 5 instructions where Triton's exp and '/'
    spend 12, with the same fp8 codes and scales downstream."""
    gf = g.to(tl.float32)
    if GELU_TANH:  # 0.5 x (1 + tanh(y)) = x * sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3)
        y = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        if LEAN:
            act = _sigmoid_times_lean(gf, y, "0fC038AA3B")  # -2 log2(e): exp(-2y) = 2^(-2 log2(e) y)
        else:
            act = gf / (1.0 + tl.exp(-2.0 * y))
    elif LEAN:
        act = _sigmoid_times_lean(gf, gf, "0fBFB8AA3B")  # -log2(e)
    else:
        act = gf / (1.0 + tl.exp(-gf))
    # Rounded to the input dtype between the activation and the multiply, as the reference's
    # two ops do.
    act = act.to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _sigmoid_times_lean(gf, z, MINUS_LOG2E_TIMES: tl.constexpr):
    """gf / (1 + exp(-k z)) (MINUS_LOG2E_TIMES: -k log2(e) as PTX float bits) as the default
    path computes it on sm_90, less its guards for ranges whose results encode alike. tl.exp
    is MUFU.EX2 of RN(-k z log2(e)) (the negation and doubling of z are exact, so one multiply
    by -k log2(e) rounds the same), plus a halving and squaring for arguments under -126,
    where exp underflows and 1 + exp = 1 either way (ftz here). '/' (div.full) is MUFU.RCP
    and a multiply, plus a scaling for divisors past 2^126 (silu's bf16 gates -87.5 to -88.5;
    none of gelu_tanh's), where it returns a value of at most |gf| 2^-126 < 1e-36 and this a
    zero of the same sign. Times an up under 1e12 either is under 1e-24: its quotient by the
    scale (1e-12 at least) encodes to that sign's zero, and a row of only such products takes
    the scale's 1e-12 floor either way, so the codes and scales are the default path's."""
    return tl.inline_asm_elementwise(
        "{ .reg .f32 t; mul.rn.f32 t, $2, " + MINUS_LOG2E_TIMES + "; ex2.approx.ftz.f32 t, t; "
        "add.rn.f32 t, t, 0f3F800000; rcp.approx.ftz.f32 t, t; mul.rn.f32 $0, $1, t; }",
        "=r,r,r", [gf, z], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _act_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, inter, BLOCK: tl.constexpr,
                        GELU_TANH: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, _act_times_up(g, u, GELU_TANH), mask=mask)


@triton.jit
def _act_and_mul_fp8_kernel(gu_ptr, codes_ptr, scales_ptr, stride_gu, stride_codes, inter, BLOCK: tl.constexpr,
                            GELU_TANH: tl.constexpr, FP8_MAX: tl.constexpr, NATIVE_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    codes, scale = quantize_row(_act_times_up(g, u, GELU_TANH).to(tl.float32), FP8_MAX, NATIVE_FP8)
    tl.store(codes_ptr + row * stride_codes + cols, codes, mask=mask)
    tl.store(scales_ptr + row, scale)


@triton.jit
def _act_and_mul_fp8_pipelined_kernel(gu_ptr, codes_ptr, scales_ptr, stride_gu, stride_codes, num_rows, inter,
                                      BLOCK: tl.constexpr, GELU_TANH: tl.constexpr, FP8_MAX: tl.constexpr,
                                      NATIVE_FP8: tl.constexpr, FMA_QUOTIENT: tl.constexpr,
                                      LEAN_ACT: tl.constexpr, STAGES: tl.constexpr):
    """`_act_and_mul_fp8_kernel`'s codes and scales from a persistent program over rows
    pid, pid + programs, ...: Triton's pipeliner copies the next STAGES - 1 rows' gate and up
    into shared memory (cp.async, sm_80+) while this row is activated, reduced, quantized and
    stored, so the SM's reads do not stop while it computes (the one-row program's phases
    run one after another, 0.49 of the copy bandwidth on the H200). A row of 14,336 bf16
    pairs takes 64 KiB of shared memory a stage. Compiled bf16 rows also spend fewer
    instructions a value (sm_90, silu: about 22 against the one-row kernel's 35):
    FMA_QUOTIENT divides by the scale through its reciprocal (`quotient_by_reciprocal`, 4
    instructions where div_rn executes 10 and a clamp 2 more), LEAN_ACT drops the activation's
    range guards (`_sigmoid_times_lean`, 5 where Triton's exp and '/' spend 12). No clamp:
    the conversion saturates at +-448 (fp8_codes) and x / scale <= 448 (1 + 2^-23); a NaN
    activation gives fp8's NaN here, where the one-row kernel's clamp turns it to -448."""
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    for row in tl.range(tl.program_id(0), num_rows, tl.num_programs(0), num_stages=STAGES):
        gu_row = gu_ptr + row * stride_gu.to(tl.int64)
        g = tl.load(gu_row + cols, mask=mask, other=0.0)
        u = tl.load(gu_row + inter + cols, mask=mask, other=0.0)
        x = _act_times_up(g, u, GELU_TANH, LEAN_ACT).to(tl.float32)
        scale = row_scale(x, FP8_MAX)
        if FMA_QUOTIENT and scale < float("inf"):  # an infinite value's row: div_rn's zeros and NaNs
            quotient = quotient_by_reciprocal(x, scale, tl.math.div_rn(1.0, scale))
        else:
            quotient = tl.math.div_rn(x, scale)
        codes, _ = fp8_codes(quotient, NATIVE_FP8)
        tl.store(codes_ptr + row * stride_codes.to(tl.int64) + cols, codes, mask=mask)
        tl.store(scales_ptr + row, scale)


def silu_and_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (last dim contiguous) -> [num_tokens, intermediate]."""
    return _act_and_mul(gate_up, block, gelu_tanh=False)


def gelu_tanh_and_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (last dim contiguous) -> [num_tokens, intermediate]."""
    return _act_and_mul(gate_up, block, gelu_tanh=True)


def act_and_mul_fp8_triton(gate_up: torch.Tensor, gelu_tanh: bool,
                           pipelined: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) * up quantized per token for the W8A8 GEMM in the same pass: the codes and
    scales of `quantize_per_token_fp8_triton(silu_and_mul_triton(gate_up))` (or gelu's),
    without the activation's round trip through memory (the bf16 product written, then read
    back to quantize). gate_up: [num_tokens, 2 * intermediate], intermediate <= MAX_ONE_PASS
    -> (float8_e4m3fn [num_tokens, intermediate], float32 scales [num_tokens, 1]).
    pipelined: which kernel (None: ACT_FP8_PIPELINED's)."""
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(-1) == 1 and inter <= MAX_ONE_PASS
    codes, scales = empty_fp8_rows(num_tokens, inter, gate_up.device)
    if num_tokens and (pipelined if pipelined is not None else ACT_FP8_PIPELINED):
        launch_act_and_mul_fp8_pipelined(gate_up, codes, scales, gelu_tanh, PIPELINED_WARPS, PIPELINED_STAGES)
    elif num_tokens:
        block = triton.next_power_of_2(inter)
        _act_and_mul_fp8_kernel[(num_tokens,)](
            gate_up, codes, scales, gate_up.stride(0), codes.stride(0), inter, BLOCK=block, GELU_TANH=gelu_tanh,
            FP8_MAX=FP8_MAX, NATIVE_FP8=native_fp8(gate_up.device),
            num_warps=row_warps(block),  # the whole row in registers
        )
    return codes.view(torch.float8_e4m3fn), scales


def launch_act_and_mul_fp8_pipelined(gate_up: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, gelu_tanh: bool,
                                     num_warps: int, stages: int, lean: bool = True) -> None:
    """The pipelined kernel over gate_up's rows into empty_fp8_rows' (codes, scales), one
    program an SM (its shared memory holds stages - 1 rows in flight), at a launch that
    benchmarks/act_fp8_bench.py varies. lean=False: div_rn and Triton's activation, to time
    the pipeline apart from the instructions it saves."""
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    block = triton.next_power_of_2(inter)
    # Under the interpreter, 4 programs: each loops over several rows, as on a GPU.
    sms = torch.cuda.get_device_properties(gate_up.device).multi_processor_count if gate_up.is_cuda else 4
    rows_in_shared = SHARED_BYTES // (2 * block * gate_up.element_size())  # float32 rows: half as many
    # Both savings compiled only (a real FMA, inline PTX), for bf16 rows: the domain their checks cover.
    lean = lean and gate_up.dtype == torch.bfloat16 and not interpreting()
    _act_and_mul_fp8_pipelined_kernel[(min(num_tokens, sms),)](
        gate_up, codes, scales, gate_up.stride(0), codes.stride(0), num_tokens, inter,
        BLOCK=block, GELU_TANH=gelu_tanh, FP8_MAX=FP8_MAX,
        NATIVE_FP8=native_fp8(gate_up.device),
        FMA_QUOTIENT=lean, LEAN_ACT=lean,
        STAGES=max(2, min(stages, rows_in_shared + 1)),
        num_warps=num_warps,
    )


def _act_and_mul(gate_up: torch.Tensor, block: int, gelu_tanh: bool) -> torch.Tensor:
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(-1) == 1
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        # 1024 columns over 4 warps: 8 bf16 (16 bytes) per thread and load.
        _act_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, GELU_TANH=gelu_tanh,
            PDL=pdl_enabled(gate_up.device), num_warps=4, launch_pdl=pdl_enabled(gate_up.device),
        )
    return out
