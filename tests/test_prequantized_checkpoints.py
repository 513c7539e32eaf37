"""AWQ, GPTQ (act-order) and FP8 (compressed-tensors) checkpoints, written here from a tiny
random Llama: each loads, runs quantized (the CPU reference path, forced) and gives the
logits of the same model saved with its dequantized weights."""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_weight_loading import LINEARS, engine

from wattserve.engine.llm import prompt_logits
from wattserve.engine.loader import ModelLoadError, load_checkpoint
from wattserve.engine.weight_loading import weight_formats

GROUP = 64
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's GEMM packing: nibble i holds column AWQ_ORDER[i]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """values: [..., W * 8] integers 0..15 -> int32 [..., W], nibble i of word w holding
    values[..., 8w + order[i]]."""
    v = values.long().reshape(*values.shape[:-1], -1, 8)
    words = sum(v[..., o] << (4 * i) for i, o in enumerate(order))
    return (words - (words >= 2**31) * 2**32).to(torch.int32)


def int4_layer(n, k, gen, act_order):
    """Random int4 codes, zeros (1..15: GPTQ stores zero - 1) and scales; the dequantized
    weight [N, K] computed directly from them."""
    q = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(1, 16, (k // GROUP, n), generator=gen)
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.02 + 0.01).half()
    g_idx = torch.arange(k) // GROUP
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    dense = (q - zeros[g_idx].T).float() * scales[g_idx].T.float()
    return q, zeros, scales, g_idx.int(), dense


def write(directory, hf_model, tokenizer, layers, quantization_config):
    """layers: {prefix: {piece: tensor}} replacing each projection's weight."""
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    for prefix, pieces in layers.items():
        del state[f"{prefix}.weight"]
        state.update({f"{prefix}.{k}": v.contiguous() for k, v in pieces.items()})
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    config = hf_model.config.to_dict()
    if quantization_config:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.hf.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="float32")
    return LlamaForCausalLM(config).eval()


def projections(model):
    return {f"model.layers.{i}.{part}.{p}": getattr(getattr(layer, part), p)
            for i, layer in enumerate(model.model.layers)
            for part, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])) for p in names}


def quantized_and_dense(tmp_path, tiny_llama, tokenizer, kind):
    """Two directories: the model in `kind`'s layout, and the model with its dequantized weights."""
    gen = torch.Generator().manual_seed(1)
    layers = {}
    for prefix, linear in projections(tiny_llama).items():
        n, k = linear.weight.shape
        if kind == "fp8":
            # Power-of-two scales and a +-448 code in every row: quantizing the dense weight
            # again at load finds these very scales and codes.
            codes = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448)
            codes[:, 0] = 448
            scales = 2.0 ** -torch.randint(6, 10, (n, 1), generator=gen).float()
            codes = codes.to(torch.float8_e4m3fn)
            layers[prefix] = {"weight": codes, "weight_scale": scales, "input_scale": torch.ones(1)}
            dense = codes.float() * scales
        else:
            q, zeros, scales, g_idx, dense = int4_layer(n, k, gen, act_order=kind == "gptq")
            if kind == "awq":
                layers[prefix] = {"qweight": pack(q.T, AWQ_ORDER), "qzeros": pack(zeros, AWQ_ORDER),
                                  "scales": scales}
            else:  # GPTQ: eight consecutive input rows a word; zeros stored minus one
                layers[prefix] = {"qweight": _gptq_rows(q), "qzeros": pack(zeros - 1), "scales": scales, "g_idx": g_idx}
        linear.weight.data.copy_(dense)
    configs = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": False},
        "fp8": {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
            "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}}},
    }
    return (write(tmp_path / kind, tiny_llama, tokenizer, layers, configs[kind]),
            write(tmp_path / f"{kind}-dense", tiny_llama, tokenizer, {}, None))


def _gptq_rows(q):
    """q: [N, K] -> int32 [K / 8, N], word r of column n holding inputs 8r .. 8r + 7."""
    n, k = q.shape
    return pack(q.reshape(n, k // 8, 8).permute(1, 0, 2).reshape(k // 8, n * 8)).reshape(k // 8, n)


@pytest.mark.parametrize("kind,source,dense_quantization", [
    ("awq", "awq int4 g64", "none"),
    ("gptq", "gptq int4 g64", "none"),
    # W8A8 quantizes activations at run time: the dense model runs the same way.
    ("fp8", "fp8 checkpoint", "fp8"),
])
def test_checkpoint_gives_the_logits_of_its_dequantized_weights(tmp_path, tiny_llama, tokenizer, kind, source,
                                                                  dense_quantization):
    quantized_dir, dense_dir = quantized_and_dense(tmp_path, tiny_llama, tokenizer, kind)
    quantized = engine("checkpoint", quantized_dir)
    formats = weight_formats(quantized.runner.model)
    # GPTQ act-order: q, k, v (gate, up) each keep their own column order: they run as parts.
    assert {part for k in LINEARS for part in formats[k].split(" + ")} == {source}
    assert (" + " in formats["qkv_proj"]) == (kind == "gptq")
    ids = tokenizer.encode("Once upon a time, in a land far away", add_special_tokens=False)
    ours = prompt_logits(quantized, ids)
    ref = prompt_logits(engine(dense_quantization, dense_dir), ids)
    # The dequantized weights are bitwise those of the dense model ((q - z) * s is exact in
    # float32 either way), and the CPU path dequantizes, then multiplies: the same float ops.
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-6, f"max relative logit error {rel:.2e}"


def test_unsupported_quantization_is_refused(tmp_path, tiny_llama, tokenizer):
    directory = write(tmp_path / "int8", tiny_llama, tokenizer, {}, {"quant_method": "bitsandbytes"})
    with pytest.raises(ModelLoadError, match="bitsandbytes"):
        load_checkpoint(directory)
