"""GGUF loading: the default model against transformers' own GGUF loader, and small
synthetic files for each tensor format, the Q/K permutation and the metadata."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from wattserve.engine.config import UnsupportedModelError
from wattserve.engine.loader import ModelLoadError, default_model_path, load_checkpoint
from wattserve.engine.loader.gguf import read_gguf
from wattserve.kernels.weight_format import QuantizedWeight, dequantize

# A one-layer llama small enough to write in milliseconds; FFN 256 so that ffn_down rows
# hold whole 256-element K-quant blocks.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 256, 32


def write_gguf(path, tensors, arch="llama", rope_theta=10000.0, metadata=()):
    """tensors: {gguf name: (array in HF layout, format)}; a uint8 array is taken as raw
    blocks of that format, anything else is quantized to it by gguf-py."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for add in metadata:
        add(w)
    tensors = {"token_embd.weight": (rand(VOCAB, HIDDEN), Q.F32), **tensors}
    for name, (data, qtype) in tensors.items():
        raw = data if data.dtype == np.uint8 else gguf.quants.quantize(data, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def rand(*shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x.flat[::97] *= 8  # a few outliers, as real weights have
    return x


def load(path):
    config, weights = read_gguf(path)
    return config, dict(weights)


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


# --- the default model, against transformers ---------------------------------------------

@pytest.fixture(scope="module")
def default_checkpoint():
    return load_checkpoint(None)


@pytest.fixture(scope="module")
def transformers_gguf():
    """transformers' dequantized, un-permuted tensors and parsed config of the default GGUF.

    from_pretrained(gguf_file=...) needs accelerate, which is not installed; this is the
    function it calls to read the file. The model only supplies parameter names, so it
    lives on the meta device.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        names_only = LlamaForCausalLM(LlamaConfig(num_hidden_layers=30))
    return load_gguf_checkpoint(default_model_path(), return_tensors=True,
                                model_to_load=names_only)


def test_default_model_weights_equal_transformers(default_checkpoint, transformers_gguf):
    reference = transformers_gguf["tensors"]
    seen, quantized = [], []
    for name, tensor in default_checkpoint.weights:
        assert name in reference, f"{name} is not a parameter transformers loads from this GGUF"
        if isinstance(tensor, QuantizedWeight):  # linears stay in their blocks (Q/K rows unpermuted)
            quantized.append(name)
            tensor = dequantize(tensor)
        ref = reference[name]
        assert tensor.dtype == torch.float32, f"{name}: {tensor.dtype}, expected float32"
        assert tensor.shape == ref.shape, \
            f"{name}: shape {tuple(tensor.shape)} != {tuple(ref.shape)}"
        assert torch.equal(tensor, ref), \
            f"{name}: max |diff| {(tensor - ref).abs().max().item():g} against transformers"
        seen.append(name)
    assert sorted(seen) == sorted(reference), \
        f"missing: {sorted(set(reference) - set(seen))[:5]}"
    assert len(seen) == 272 and "lm_head.weight" not in seen  # tied embeddings
    assert len(quantized) == 30 * 7 and all(n.endswith("_proj.weight") for n in quantized)


def test_default_model_config(default_checkpoint, transformers_gguf):
    cfg, ref = default_checkpoint.model_config, transformers_gguf["config"]
    assert cfg.architecture == "LlamaForCausalLM"
    got = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
           cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps,
           cfg.max_position_embeddings, cfg.tie_word_embeddings, cfg.bos_token_id)
    expected = tuple(ref[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id"))
    assert got == expected
    assert cfg.rope_scaling is None and not cfg.attention_bias
    assert cfg.eos_token_ids == [2] == default_checkpoint.tokenizer.eos_token_ids  # <|im_end|>
    assert default_checkpoint.name == "SmolLM2-135M-Instruct.Q4_1"
    assert default_checkpoint.tokenizer.vocab_size == 49152
    assert default_checkpoint.tokenizer.chat_template is not None


# --- tensor formats ----------------------------------------------------------------------

@pytest.mark.parametrize("qtype, exact", [
    (Q.F32, lambda x: x),
    (Q.F16, lambda x: x.astype(np.float16).astype(np.float32)),
    (Q.BF16, lambda x: torch.from_numpy(x).bfloat16().float().numpy()),  # round to nearest even
])
def test_float_formats_load_exactly(tmp_path, qtype, exact):
    down, up = rand(HIDDEN, FFN, seed=1), rand(FFN, HIDDEN, seed=2)
    path = write_gguf(tmp_path / "f.gguf", {"blk.0.ffn_down.weight": (down, qtype),
                                            "blk.0.ffn_up.weight": (up, qtype)})
    _, w = load(path)
    for name, x in [("model.layers.0.mlp.down_proj.weight", down),
                    ("model.layers.0.mlp.up_proj.weight", up)]:
        assert w[name].dtype == torch.float32
        assert tuple(w[name].shape) == x.shape, f"{name} must be HF [out, in] = {x.shape}"
        np.testing.assert_array_equal(w[name].numpy(), exact(x), err_msg=f"{qtype.name} {name}")


def f16_error(v):
    return np.abs(v - v.astype(np.float16).astype(np.float64))


def block_error_bound(x, qtype):
    """Per element, the largest |x - dequantize(quantize(x))| each 32-element format allows.

    Q8_0: q = round(x / d), d = amax / 127: half a step. Q4_0/Q5_0: d = -max / 8 (/ 16) with
    codes clipped to 15 (31), so the extreme opposite the block's max loses a whole step.
    Q4_1/Q5_1: d = (max - min) / 15 (/ 31), codes rounded: half a step. Storing d (and min)
    as float16 moves every level by up to code * |d - fp16(d)| (+ |min - fp16(min)|).
    """
    b = x.reshape(-1, 32).astype(np.float64)
    amax, lo, hi = np.abs(b).max(1), b.min(1), b.max(1)
    if qtype == Q.Q8_0:
        d = amax / 127
        bound = d / 2 + 127 * f16_error(d)
    elif qtype in (Q.Q4_0, Q.Q5_0):
        half_levels = 8 if qtype == Q.Q4_0 else 16
        d = amax / half_levels
        bound = d + half_levels * f16_error(d)
    else:
        levels = 15 if qtype == Q.Q4_1 else 31
        d = (hi - lo) / levels
        bound = d / 2 + levels * f16_error(d) + f16_error(lo)
    # float32 arithmetic inside the quantizer
    return (np.repeat(bound, 32) * (1 + 1e-5) + 1e-6).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_block_quants_within_error_bound(tmp_path, qtype):
    x = rand(FFN, HIDDEN, seed=3)
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.ffn_gate.weight": (x, qtype)})
    _, w = load(path)
    got = w["model.layers.0.mlp.gate_proj.weight"].numpy()
    assert got.shape == x.shape
    err, bound = np.abs(got - x), block_error_bound(x, qtype)
    worst = np.unravel_index(np.argmax(err / bound), x.shape)
    assert (err <= bound).all(), (
        f"{qtype.name}: error {err[worst]:g} at {worst} exceeds the format's bound "
        f"{bound[worst]:g} (x = {x[worst]:g}, got {got[worst]:g})")


def pack_q4_k(d, dmin, sc, mins, q):
    """One ggml block_q4_K from chosen values (ggml-common.h, ggml-quants.c):
    half d, half dmin, 12 bytes holding eight 6-bit (scale, min) pairs, then 128 bytes where
    byte 32c + l holds element l of sub-block 2c (low nibble) and of 2c+1 (high nibble)."""
    scales = np.zeros(12, np.uint8)
    for j in range(4):
        scales[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        scales[j + 4] = (mins[j] & 63) | ((mins[j + 4] >> 4) << 6)
        scales[j + 8] = (sc[j + 4] & 15) | ((mins[j + 4] & 15) << 4)
    qs = np.zeros(128, np.uint8)
    for c in range(4):
        qs[32 * c:32 * c + 32] = q[2 * c] | (q[2 * c + 1] << 4)
    head = np.array([d, dmin], np.float16).view(np.uint8)
    return np.concatenate([head, scales, qs])


def pack_q6_k(d, scales, q):
    """One ggml block_q6_K: ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16], half d.
    Element 128h + 32k + l: low nibble (k < 2) or high nibble (k >= 2) of
    ql[64h + l + 32(k % 2)], high bits at shift 2k of qh[32h + l]."""
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):
        for k in range(4):
            for l in range(32):
                v = int(q[128 * h + 32 * k + l])
                ql[64 * h + l + 32 * (k % 2)] |= (v & 15) << (4 * (k // 2))
                qh[32 * h + l] |= (v >> 4) << (2 * k)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8),
                           np.array([d], np.float16).view(np.uint8)])


def test_q4_k_blocks_decode_to_known_values(tmp_path):
    rng = np.random.default_rng(4)
    rows, expected = [], []
    for r in range(HIDDEN):  # ffn_down is [HIDDEN, FFN]: one 256-element block per row
        d, dmin = [0.5, 0.25, 1.0, 2.0][r % 4], [0.25, 0.125, 1.0, 0.5][r % 4]  # exact in fp16
        sc, mins = rng.integers(0, 64, 8), rng.integers(0, 64, 8)  # 6 bits: high bits used
        q = rng.integers(0, 16, (8, 32))
        rows.append(pack_q4_k(d, dmin, sc, mins, q.astype(np.uint8)))
        expected.append((d * sc[:, None] * q - dmin * mins[:, None]).reshape(-1))
    raw = np.stack(rows)
    assert raw.shape == (HIDDEN, 144)
    _, w = load(write_gguf(tmp_path / "q4k.gguf", {"blk.0.ffn_down.weight": (raw, Q.Q4_K)}))
    np.testing.assert_array_equal(w["model.layers.0.mlp.down_proj.weight"].numpy(),
                                  np.array(expected, np.float32),
                                  err_msg="Q4_K: y = d * scale[j] * q - dmin * min[j]")


def test_q6_k_blocks_decode_to_known_values(tmp_path):
    rng = np.random.default_rng(5)
    rows, expected = [], []
    for r in range(HIDDEN):
        d = [0.25, 0.5, 1.0, 0.125][r % 4]
        scales = rng.integers(-128, 128, 16)  # signed 8-bit
        q = rng.integers(0, 64, 256)  # 6 bits, stored with an offset of 32
        rows.append(pack_q6_k(d, scales, q))
        expected.append(d * np.repeat(scales, 16) * (q - 32))
    raw = np.stack(rows)
    assert raw.shape == (HIDDEN, 210)
    _, w = load(write_gguf(tmp_path / "q6k.gguf", {"blk.0.ffn_down.weight": (raw, Q.Q6_K)}))
    np.testing.assert_array_equal(w["model.layers.0.mlp.down_proj.weight"].numpy(),
                                  np.array(expected, np.float32),
                                  err_msg="Q6_K: y = d * scale[i // 16] * (q - 32)")


# --- layout, names and metadata ----------------------------------------------------------

def attention_weights():
    return (rand(HEADS * HEAD_DIM, HIDDEN, seed=6), rand(KV_HEADS * HEAD_DIM, HIDDEN, seed=7),
            rand(KV_HEADS * HEAD_DIM, HIDDEN, seed=8))


def test_llama_q_and_k_permutation_is_undone(tmp_path):
    q, k, v = attention_weights()
    path = write_gguf(tmp_path / "llama.gguf", {
        "blk.0.attn_q.weight": (llama_cpp_permute(q, HEADS), Q.F32),
        "blk.0.attn_k.weight": (llama_cpp_permute(k, KV_HEADS), Q.F32),
        "blk.0.attn_v.weight": (v, Q.F32),
    })
    config, w = load(path)
    assert config.architecture == "LlamaForCausalLM"
    for proj, x in [("q_proj", q), ("k_proj", k), ("v_proj", v)]:
        np.testing.assert_array_equal(w[f"model.layers.0.self_attn.{proj}.weight"].numpy(), x,
                                      err_msg=f"{proj} not back in HF layout")


def test_qwen2_is_not_permuted_and_has_biases(tmp_path):
    q, k, v = attention_weights()
    biases = {p: rand(x.shape[0], seed=9 + i) for i, (p, x) in enumerate(zip("qkv", (q, k, v)))}
    path = write_gguf(tmp_path / "qwen2.gguf", {
        "blk.0.attn_q.weight": (q, Q.F32), "blk.0.attn_k.weight": (k, Q.F32),
        "blk.0.attn_v.weight": (v, Q.F32),
        **{f"blk.0.attn_{p}.bias": (b, Q.F32) for p, b in biases.items()},
    }, arch="qwen2")
    config, w = load(path)
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias
    for p, x in zip("qkv", (q, k, v)):
        np.testing.assert_array_equal(w[f"model.layers.0.self_attn.{p}_proj.weight"].numpy(), x)
        np.testing.assert_array_equal(w[f"model.layers.0.self_attn.{p}_proj.bias"].numpy(),
                                      biases[p], err_msg=f"{p} bias")


def test_every_tensor_name_maps_to_hf(tmp_path):
    shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,), "ffn_gate": (FFN, HIDDEN),
              "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    tensors = {f"blk.0.{n}.weight": (rand(*s), Q.F32) for n, s in shapes.items()}
    tensors |= {"output_norm.weight": (rand(HIDDEN), Q.F32),
                "output.weight": (rand(VOCAB, HIDDEN), Q.F32)}
    config, w = load(write_gguf(tmp_path / "all.gguf", tensors))
    layer = "model.layers.0."
    assert {n: tuple(t.shape) for n, t in w.items()} == {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        layer + "self_attn.q_proj.weight": shapes["attn_q"],
        layer + "self_attn.k_proj.weight": shapes["attn_k"],
        layer + "self_attn.v_proj.weight": shapes["attn_v"],
        layer + "self_attn.o_proj.weight": shapes["attn_output"],
        layer + "input_layernorm.weight": (HIDDEN,),
        layer + "post_attention_layernorm.weight": (HIDDEN,),
        layer + "mlp.gate_proj.weight": (FFN, HIDDEN),
        layer + "mlp.up_proj.weight": (FFN, HIDDEN),
        layer + "mlp.down_proj.weight": (HIDDEN, FFN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    assert not config.tie_word_embeddings, "an output.weight tensor means untied embeddings"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
            config.num_heads, config.num_kv_heads, config.head_dim) == \
        (VOCAB, HIDDEN, FFN, 1, HEADS, KV_HEADS, HEAD_DIM)
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM,
                            max_position_embeddings=131072,
                            rope_parameters={**scaling, "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    divisors = (plain / scaled).numpy()  # what llama.cpp writes as rope_freqs.weight
    assert ((divisors > 1.01) & (divisors < 31.9)).any(), "want a frequency in the smooth band"
    path = write_gguf(tmp_path / "llama3.gguf", {"rope_freqs.weight": (divisors, Q.F32)},
                      rope_theta=500000.0)
    config, w = load(path)
    assert config.rope_scaling == scaling
    assert "rope_freqs.weight" not in w and all("rope" not in n for n in w)

    path = write_gguf(tmp_path / "odd.gguf", {"rope_freqs.weight": (divisors * 1.5, Q.F32)},
                      rope_theta=500000.0)
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        read_gguf(path)


def test_linear_rope_scaling_metadata(tmp_path):
    path = write_gguf(tmp_path / "linear.gguf", {}, metadata=[
        lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
        lambda w: w.add_rope_scaling_factor(4.0)])
    config, _ = read_gguf(path)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_unsupported_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tmp_path / "yarn.gguf", {}, metadata=[
        lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
        lambda w: w.add_rope_scaling_factor(4.0)])
    with pytest.raises(UnsupportedModelError, match="yarn"):
        read_gguf(path)


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'phi2'"):
        read_gguf(write_gguf(tmp_path / "phi2.gguf", {}, arch="phi2"))


def test_foreign_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "qkv.gguf",
                      {"blk.0.attn_qkv.weight": (rand(3 * HIDDEN, HIDDEN), Q.F32)})
    with pytest.raises(ModelLoadError, match="blk.0.attn_qkv.weight"):
        read_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ModelLoadError, match="could not read .* as a GGUF file"):
        load_checkpoint(str(path))
