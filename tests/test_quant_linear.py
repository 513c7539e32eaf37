"""Quantized weight formats: GGUF blocks repacked dequantize exactly as the gguf package does;
the Triton dequantize-in-the-loop kernel (decode and prefill tiles) against
dequantize-then-matmul on odd shapes; the ops.linear entry over stacked parts and biases.

Runs under Triton's interpreter on CPU by default; TRITON_INTERPRET=0 runs it on a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: first

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from wattserve.engine.loader.gguf_blocks import blocks_to_weight
from wattserve.kernels import triton_quant_linear
from wattserve.kernels.dispatch import REFERENCE_OPS, ops_for
from wattserve.kernels.norm import add_rms_norm_ref, rms_norm_ref
from wattserve.kernels.quant_linear import for_any_weight, linear_ref, quant_linear_ref
from wattserve.kernels.triton_activation import act_and_mul_fp8_triton, gelu_tanh_and_mul_triton, silu_and_mul_triton
from wattserve.kernels.triton_interpreter import fix_loop_bounds
from wattserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_fp8_triton, rms_norm_triton
from wattserve.kernels.triton_quant_linear import (
    DENSE_MIN_ROWS,
    GEMM_CONFIG,
    GEMV_CONFIG,
    Fp8Rows,
    dequantize_triton,
    fp8_gated_linear,
    quant_linear_triton,
    quant_matmul_triton,
)
from wattserve.kernels.triton_quant_gemv import default_config, gemv_fits, quant_gemv_triton
from wattserve.kernels.triton_token_quant import quantize_per_token_fp8_triton
from wattserve.kernels.weight_format import (
    QuantizedParts,
    QuantizedWeight,
    dequantize,
    quantize_fp8,
    quantize_int4,
    quantize_per_token_fp8,
    stack,
)

ON_GPU = os.environ["TRITON_INTERPRET"] != "1"
if not ON_GPU:
    fix_loop_bounds()
DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter's float32 dots are exact; compiled ones would take tf32, so the GPU runs
# bfloat16 activations, as served, against a bound of a few bf16 roundings.
DTYPE, REL_ERR = (torch.bfloat16, 1e-2) if ON_GPU else (torch.float32, 1e-5)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm of the difference over the reference's, in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[::97] *= 8  # a few outliers, as real weights have
    return x


# K-quant super-blocks: bytes, and where their float16 scales sit (gguf-py cannot quantize
# them, so tests fill random bytes and put small finite scales there).
K_QUANTS = {Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}


def gguf_weight(qtype, n, k, seed=0):
    if qtype in K_QUANTS:
        size, scale_at = K_QUANTS[qtype]
        rng = np.random.default_rng(seed)
        raw = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
        for at in scale_at:
            raw[:, at : at + 2] = (rng.random((len(raw), 1)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8)
        raw = raw.reshape(n, -1)
    else:
        raw = gguf.quants.quantize(rand(n, k, seed=seed).numpy(), qtype)
    return raw, blocks_to_weight(raw, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, *K_QUANTS])
def test_gguf_blocks_dequantize_as_the_gguf_package(qtype):
    k = 512 if qtype in K_QUANTS else 96
    raw, w = gguf_weight(qtype, 7, k)
    expected = gguf.quants.dequantize(raw, qtype).reshape(7, k)
    assert torch.equal(dequantize(w), torch.from_numpy(expected))


def test_int4_rtn_error_is_within_half_a_step():
    w = rand(5, 256)
    q = quantize_int4(w, 128)
    step = q.scales.float().repeat_interleave(128, dim=1)
    assert ((dequantize(q) - w).abs() <= step / 2 + 1e-6).all()
    assert q.codes.numel() == 5 * 128  # two codes a byte


def test_fp8_per_channel_relative_error():
    w = rand(9, 64)
    q = quantize_fp8(w)
    # e4m3 keeps 3 mantissa bits: a relative step of 2^-3, so rounding errs by <= 2^-4.
    assert ((dequantize(q) - w).abs() <= w.abs() * 2**-4 + q.scales * 2**-9).all()


def _weights():
    """One weight per format and stored layout, with K no multiple of the kernel's BLOCK_K."""
    gptq = quantize_int4(rand(37, 192, seed=3), 64)
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(0))
    return {
        "gguf_q4_0": gguf_weight(Q.Q4_0, 37, 96)[1],
        "gguf_q4_1": gguf_weight(Q.Q4_1, 70, 160, seed=1)[1],
        "gguf_q8_0": gguf_weight(Q.Q8_0, 37, 96, seed=2)[1],
        "gguf_q4_k": gguf_weight(Q.Q4_K, 21, 256, seed=5)[1],
        "gguf_q5_k": gguf_weight(Q.Q5_K, 21, 256, seed=6)[1],
        "gguf_q6_k": gguf_weight(Q.Q6_K, 21, 256, seed=7)[1],
        # g128: the decode tile spans two groups, the prefill tile half of one.
        "int4_g128": quantize_int4(rand(29, 384, seed=8), 128),
        "int4_g64_act_order": QuantizedWeight("u4", gptq.codes, gptq.scales, 64, gptq.offsets, perm),
        "fp8": quantize_fp8(rand(45, 80, seed=4)),
    }


WEIGHTS = _weights()


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_triton_quant_matmul_against_dequantize_then_matmul(name, m):
    w = WEIGHTS[name].to(DEVICE)
    x = rand(m, w.in_features, seed=m).to(DEVICE, DTYPE)
    ref = x.double() @ dequantize(w).double().T
    # Dequantized values are exact in float32 and the dot accumulates in float32 (no tf32 in
    # the interpreter): only summation order differs.
    for config in (GEMV_CONFIG, GEMM_CONFIG):
        out = quant_matmul_triton(x, w, config)
        err = relative_error(out, ref)
        assert err < REL_ERR, f"{config}: relative error {err:.2e}"


SERVED_GEMV_TILES = [(4, 1024, 4), (32, 512, 8), (8, 2048, 8), (16, 1024, 4), (8, 2048, 4)]


@pytest.mark.parametrize("name", WEIGHTS)
def test_triton_quant_gemv_against_dequantize_then_matmul(name):
    w = WEIGHTS[name].to(DEVICE)
    x = rand(1, w.in_features, seed=1).to(DEVICE, DTYPE)
    ref = x.double() @ dequantize(w).double().T
    # Every tile default_config serves (longer than these rows' K: masked) and a short one
    # (several tiles, each of whole groups). Weights are exact in float32, products summed
    # in float32.
    short = (16, max(64, w.group if w.group < w.in_features else 0), 4)
    for config in {default_config(w), short, *(c for c in SERVED_GEMV_TILES if gemv_fits(x, w, c))}:
        assert gemv_fits(x, w, config), config
        out = quant_gemv_triton(x, w, config)
        err = relative_error(out, ref)
        assert err < REL_ERR, f"{config}: relative error {err:.2e}"


@pytest.mark.parametrize("name", WEIGHTS)
def test_triton_dequantize_equals_the_reference_in_stored_column_order(name):
    w = WEIGHTS[name].to(DEVICE)
    ref = dequantize(w)
    if w.perm is not None:
        ref = ref[:, w.perm]
    # The same float32 multiply and add per weight; a GPU may fuse them into one rounding.
    torch.testing.assert_close(dequantize_triton(w, torch.float32), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", WEIGHTS)
def test_prefill_sized_batches_multiply_the_dequantized_weight(name):
    w = WEIGHTS[name].to(DEVICE)
    if ON_GPU and w.kind == "fp8":
        pytest.skip("fp8 prefill runs W8A8 on the tensor cores (the test below)")
    x = rand(DENSE_MIN_ROWS, w.in_features, seed=16).to(DEVICE, DTYPE)
    ref = x.double() @ dequantize(w).double().T
    out = quant_linear_triton(x, w).double()
    assert relative_error(out, ref) < REL_ERR


def test_stacked_parts_and_bias_through_linear():
    q, k = quantize_int4(rand(16, 128, seed=5), 64), quantize_fp8(rand(8, 128, seed=6))
    parts = stack([q, k])
    assert isinstance(parts, QuantizedParts) and parts.shape == (24, 128)
    same = stack([q, quantize_int4(rand(8, 128, seed=7), 64)])
    assert isinstance(same, QuantizedWeight) and same.shape == (24, 128)
    x, bias = rand(3, 128, seed=8), rand(24, seed=9)
    expected = torch.cat([quant_linear_ref(x, q), quant_linear_ref(x, k)], dim=-1) + bias
    assert torch.equal(linear_ref(x, parts, bias), expected)
    triton_linear = for_any_weight(torch.nn.functional.linear, quant_matmul_triton)
    same, x_dev, bias_dev = same.to(DEVICE), x.to(DEVICE, DTYPE), bias.to(DEVICE, DTYPE)
    ref = x_dev.double() @ dequantize(same).double().T + bias_dev.double()
    out = triton_linear(x_dev, same, bias_dev).double()
    assert relative_error(out, ref) < REL_ERR
    dense = dequantize(same).cpu()
    assert torch.equal(linear_ref(x, dense, bias), torch.nn.functional.linear(x, dense, bias))


def test_fp8_reference_quantizes_activations_per_token():
    w, x = quantize_fp8(rand(32, 64, seed=10)), rand(4, 64, seed=11)
    x[0] *= 1000  # per token: a loud row does not coarsen the others
    weight_only = x @ dequantize(w).T
    w8a8 = quant_linear_ref(x, w)
    assert not torch.equal(w8a8, weight_only)
    rel = (w8a8 - weight_only).norm(dim=-1) / weight_only.norm(dim=-1)
    # Each activation errs by <= 2^-4 relative; summed over K with random signs the output
    # errs by far less: a bound of 2^-4 leaves room.
    assert (rel < 2**-4).all(), rel


def test_gguf_rows_permute_with_their_scales():
    raw, w = gguf_weight(Q.Q4_1, 8, 64)
    order = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
    assert torch.equal(dequantize(w.map_rows(lambda t: t[order])), dequantize(w)[order])



def test_dispatch_runs_every_weight_kind_through_one_op():
    from wattserve.kernels.dispatch import REFERENCE_OPS, triton_ops

    linear = triton_ops().linear
    x, bias = rand(5, 96, seed=12).to(DEVICE, DTYPE), rand(37, seed=13).to(DEVICE, DTYPE)
    for w in (WEIGHTS["gguf_q4_0"].to(DEVICE), stack([WEIGHTS["gguf_q8_0"].to(DEVICE)] * 2),
              dequantize(WEIGHTS["gguf_q4_0"], DTYPE).to(DEVICE)):
        b = bias if w.shape[0] == 37 else None
        out, ref = linear(x, w, b).double(), REFERENCE_OPS.linear(x, w, b).double()
        assert relative_error(out, ref) < REL_ERR


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [2500, 17000])  # a row in registers; a longer one, in two passes
def test_triton_per_token_fp8_gives_the_references_codes_and_scales(dtype, k):
    x = rand(7, k, seed=17).to(DEVICE, dtype)  # not a multiple of the kernel's block
    x[3] = 0  # a zero row: the scale's floor
    assert_same_fp8(quantize_per_token_fp8_triton(x), quantize_per_token_fp8(x))


def assert_same_fp8(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    """Per-token fp8 (codes, scales) equal to the last bit."""
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))


@pytest.mark.skipif(not ON_GPU, reason="torch._scaled_mm: fp8 tensor cores")
def test_fp8_prefill_on_tensor_cores_matches_the_w8a8_reference():
    w = quantize_fp8(rand(96, 256, seed=14)).to(DEVICE)
    x = rand(33, 256, seed=15).to(DEVICE, torch.bfloat16)
    out, ref = quant_linear_triton(x, w).double(), quant_linear_ref(x.float(), w).double()
    # Both multiply the same fp8 codes of x and w; bf16 output rounding is the difference.
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("gelu_tanh", [False, True])
def test_activation_quantized_in_its_kernel_equals_activation_then_quantization(gelu_tanh):
    gate_up = rand(9, 2 * 700, seed=16).to(DEVICE, DTYPE)  # 700 columns: a masked tail
    act = (gelu_tanh_and_mul_triton if gelu_tanh else silu_and_mul_triton)(gate_up)
    assert_same_fp8(act_and_mul_fp8_triton(gate_up, gelu_tanh), quantize_per_token_fp8_triton(act))


@pytest.mark.skipif(not ON_GPU, reason="torch._scaled_mm: fp8 tensor cores")
def test_gated_linear_over_fp8_fuses_the_quantization_and_matches_the_reference():
    w = quantize_fp8(rand(96, 512, seed=17)).to(DEVICE)
    gate_up = rand(33, 1024, seed=18).to(DEVICE, torch.bfloat16)
    assert fp8_gated_linear(gate_up, w, False) is not None  # prefill-sized: the fused path
    assert fp8_gated_linear(gate_up[:1], w, False) is None  # decode: the GEMV
    out = ops_for(torch.device(DEVICE)).gated_linear(gate_up, w, False)
    assert torch.equal(out, quant_linear_triton(silu_and_mul_triton(gate_up), w))  # the same codes, one GEMM
    ref = REFERENCE_OPS.gated_linear(gate_up.float(), w, False)
    assert relative_error(out, ref) < 1e-2


# ---- the norm before an fp8 linear writes fp8 rows (triton_quant_linear.NORM_WRITES_FP8) ----

def norm_then_quantize(x, weight, residual):
    """What the unfused path computes: (codes, scales) of the plain Triton norm's rows, and the
    new residual stream."""
    if residual is None:
        return quantize_per_token_fp8_triton(rms_norm_triton(x, weight, 1e-5)), x
    normed, residual = add_rms_norm_triton(x.clone(), residual.clone(), weight, 1e-5)
    return quantize_per_token_fp8_triton(normed), residual


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [100, 2500])  # odd widths: masked tails
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_quantized_in_its_kernel_equals_norm_then_quantization(dtype, hidden, with_residual):
    x, weight = rand(7, hidden, seed=20).to(DEVICE, dtype), rand(hidden, seed=21).to(DEVICE, dtype)
    residual = rand(7, hidden, seed=22).to(DEVICE, dtype) if with_residual else None
    x[3] = 0 if residual is None else -residual[3]  # a zero row: the scale's floor
    want, want_residual = norm_then_quantize(x, weight, residual)
    got_residual = None if residual is None else residual.clone()
    x_before = x.clone()
    got = rms_norm_fp8_triton(x, weight, 1e-5, got_residual)
    assert_same_fp8(got, want)
    assert got[1][3].item() == torch.tensor(1e-12).item()  # the zero row: the floor, float32
    assert torch.equal(x, x_before)  # x is never written
    if residual is not None:
        assert torch.equal(got_residual, want_residual)  # x + residual, in place
    # The oracle's own oracle, the PyTorch references, up to the Triton norm's last-bit
    # differences: its rows are rounded twice to x's dtype (normed, then times the weight), a
    # unit in the last place each (2^-7 relative in bf16), and a code may then be one e4m3
    # step (2^-3 relative; 2^-9 of the scale among subnormals) off.
    ref = rms_norm_ref(x, weight, 1e-5) if residual is None else add_rms_norm_ref(x, residual, weight, 1e-5)[0]
    codes, scales = quantize_per_token_fp8(ref)
    row_rtol = 2 * 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got[1], scales, rtol=row_rtol, atol=0)
    torch.testing.assert_close(got[0].float() * got[1], codes.float() * scales, rtol=2**-3 + row_rtol,
                               atol=2**-9 * scales.max().item())


def cpu_scaled_mm_fits(x, w):
    """_scaled_mm_fits without the GPU: torch._scaled_mm also runs on CPU (torch 2.13), so the
    interpreter can take the W8A8 path."""
    return x.dtype == torch.bfloat16 and w.in_features % 16 == 0 and w.out_features % 16 == 0


def test_fp8_model_gives_the_same_logits_with_the_norm_writing_fp8(tiny_qwen2_dir, monkeypatch):
    """The shared decoder on the CUDA path's ops (interpreted on CPU), bfloat16, fp8 weights:
    a prefill's logits bit-identical with NORM_WRITES_FP8 on and off, and on, every norm before
    qkv and gate_up (2 a layer) quantizing its rows itself. Qwen2's qkv bias is added after the
    GEMM of the norm's codes."""
    from wattserve.engine import model_runner
    from wattserve.engine.llm import LLM, prompt_logits
    from wattserve.kernels.dispatch import triton_ops

    monkeypatch.setattr(model_runner, "ops_for", lambda device: triton_ops())
    if not ON_GPU:
        monkeypatch.setattr(triton_quant_linear, "_scaled_mm_fits", cpu_scaled_mm_fits)
    fused_calls = []

    def counted(*args):
        fused_calls.append(args[0].shape)
        return rms_norm_fp8_triton(*args)

    monkeypatch.setattr(triton_quant_linear, "rms_norm_fp8_triton", counted)
    core = LLM(str(tiny_qwen2_dir), device=DEVICE, dtype="bfloat16", quantization="fp8", kv_cache_memory=16 << 20,
               warm_up=False, enable_prefix_caching=False).core
    ids = core.tokenizer.encode("Once upon a time, in a land far away, there lived a fox who counted the stars",
                                add_special_tokens=False)
    assert len(ids) > triton_quant_linear.GEMV_MAX_ROWS  # the rows go to the W8A8 GEMM
    unfused = prompt_logits(core, ids)
    assert fused_calls == []  # off by default
    monkeypatch.setattr(triton_quant_linear, "NORM_WRITES_FP8", True)
    fused = prompt_logits(core, ids)
    assert fused_calls == [(len(ids), core.model_config.hidden_size)] * (2 * core.model_config.num_layers)
    assert torch.equal(fused, unfused)
    # Decode-sized rows go to the GEMV, whose input stays the plain norm's rows.
    fused_calls.clear()
    prompt_logits(core, ids[:triton_quant_linear.GEMV_MAX_ROWS])
    assert fused_calls == []


@pytest.mark.skipif(not ON_GPU, reason="the compiled kernels' own fp8 conversion and torch._scaled_mm")
@pytest.mark.parametrize("with_residual", [False, True])
def test_compiled_norm_writing_fp8_equals_norm_then_quantization_at_llama_shapes(with_residual, monkeypatch):
    """Llama-3.1-8B's hidden size in bfloat16 as served: the fused kernel's codes and scales,
    and the qkv GEMM's output through Ops.norm_before, bit-identical to the unfused path."""
    hidden, tokens = 4096, 300
    x, weight = rand(tokens, hidden, seed=23).to(DEVICE, torch.bfloat16), rand(hidden, seed=24).to(DEVICE, torch.bfloat16)
    residual = rand(tokens, hidden, seed=25).to(DEVICE, torch.bfloat16) if with_residual else None
    want, want_residual = norm_then_quantize(x, weight, residual)
    assert_same_fp8(rms_norm_fp8_triton(x, weight, 1e-5, None if residual is None else residual.clone()), want)
    qkv = quantize_fp8(rand(6144, hidden, seed=26)).to(DEVICE)
    ops = ops_for(torch.device(DEVICE))
    outputs = []
    for on in (False, True):
        monkeypatch.setattr(triton_quant_linear, "NORM_WRITES_FP8", on)
        h, new_residual = ops.norm_before(x.clone(), None if residual is None else residual.clone(), weight, 1e-5, qkv)
        assert isinstance(h, Fp8Rows) == on
        assert torch.equal(new_residual, want_residual)
        outputs.append(ops.linear(h, qkv))
    assert torch.equal(outputs[1], outputs[0])
