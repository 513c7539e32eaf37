"""GGUF checkpoints (llama.cpp): metadata to ModelConfig, tensors dequantized to HF layout.

Three things differ from an HF checkpoint besides the names: GGUF lists dimensions
innermost first (we produce HF's [out, in]), weights may be block-quantized (dequantized to
float32 with gguf.quants), and llama.cpp's converter permutes the rows of llama-arch Q and K
so that rotary pairs sit next to each other; we undo that so the model sees HF's
half-split rotary layout. Mixture-of-experts files stack each layer's experts in one
tensor per projection (`ffn_gate_exps`: [experts, intermediate, hidden] in HF order); we
hand them on one expert at a time under the HF checkpoints' per-expert names.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from wattserve.engine.config import ModelConfig, UnsupportedModelError
from wattserve.engine.loader import ModelLoadError, gguf_blocks
from wattserve.kernels.weight_format import QuantizedWeight

# llama.cpp writes Mixtral as "llama" with experts (see _architecture).
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                  "olmo2": "Olmo2ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                  "olmoe": "OlmoeForCausalLM"}

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
# Where an architecture's tensors differ from the table above.
_POST_NORMS = {"post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
_GEMMA_NORMS = {**_POST_NORMS, "ffn_norm": "pre_feedforward_layernorm"}
_PER_LAYER_BY_ARCH = {
    # Phi-3 stores q/k/v fused, and gate/up fused under ffn_up.
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
    "olmo2": _POST_NORMS,
}
# llama.cpp's Gemma 27B models (by layer count) scale queries by hidden / heads, the others by
# head_dim; its converter writes no query_pre_attn_scalar.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Stacked expert tensors; "{}" in the HF name stands for the expert index.
_EXPERT_STACKS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# llama.cpp's expert_gating_func value for a softmax router (the only kind these families use).
_SOFTMAX_GATING = 1
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Mixtral GGUFs converted before llama.cpp stacked experts (early 2024): one tensor per expert.
_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_ROPE_FREQS = "rope_freqs.weight"
# Phi-3's longrope factors, which llama.cpp stores as tensors
_ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
_REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")

# llama.cpp bakes Llama 3.1/3.2 rope scaling into per-frequency divisors (rope_freqs.weight)
# and drops the parameters. Every released Llama 3.x model used these three with
# factor = the largest divisor; we accept the tensor only if they reproduce it.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def read_gguf(path: str, keep_quantized: bool = False) \
        -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor | QuantizedWeight]]]:
    """The model config and a lazy iterator over (HF name, float32 tensor) of the file;
    keep_quantized: linear weights in the block formats of gguf_blocks come as QuantizedWeight."""
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {path} as a GGUF file: {e}") from e
    config = _model_config(reader, path)
    arch = reader.fields["general.architecture"].contents()
    plan = [(t, hf_name) for t in reader.tensors if (hf_name := _hf_name(t.name, arch, path))]
    return config, _weights(plan, config, path, keep_quantized)


def load_tokenizer(path: str) -> Any:
    """The transformers tokenizer rebuilt from the file's metadata (about 9 s for SmolLM2)."""
    from transformers import AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not build a tokenizer from {path}: {e}") from e


def _model_config(reader: GGUFReader, path: str) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} in {path} is not supported; wattserve runs "
            f"{', '.join(_ARCHITECTURES)} GGUF files"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor")
    shape = {k: get(f"{arch}.{k}") for k in _REQUIRED}
    missing = [f"{arch}.{k}" for k, v in shape.items() if v is None]
    if missing:
        raise ModelLoadError(f"{path} lacks the metadata {', '.join(missing)}")
    hidden, heads = shape["embedding_length"], shape["attention.head_count"]
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count") \
        or hidden // heads
    rope_theta = get(f"{arch}.rope.freq_base", 10000.0)
    eos = [get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    experts = get(f"{arch}.expert_count", 0)
    if experts and get(f"{arch}.expert_gating_func", _SOFTMAX_GATING) != _SOFTMAX_GATING:
        raise UnsupportedModelError(f"{path}: only softmax expert routers are supported")
    # Laid out as an HF config.json so that ModelConfig.from_hf validates it in one place.
    hf_config = {
        "architectures": ["MixtralForCausalLM" if arch == "llama" and experts else _ARCHITECTURES[arch]],
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF shape: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": shape["feed_forward_length"],
        "num_hidden_layers": shape["block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(get, arch, tensors, rope_theta, head_dim),
        "max_position_embeddings": get(f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(i for i in eos if i is not None)),
        "sliding_window": get(f"{arch}.attention.sliding_window") or None,
        "num_experts": experts,
        "num_experts_per_tok": get(f"{arch}.expert_used_count"),
        "moe_intermediate_size": get(f"{arch}.expert_feed_forward_length"),
        # llama.cpp renormalizes the top-k weights of llama (Mixtral) and qwen3moe routers,
        # not olmoe's.
        "norm_topk_prob": get(f"{arch}.expert_weights_norm", arch != "olmoe"),
    }
    if arch in _GEMMA_27B_LAYERS:
        hf_config.update(_gemma_config(get, arch, hf_config))
    config = ModelConfig.from_hf(hf_config)
    if arch in _GEMMA_27B_LAYERS:
        # llama.cpp's converter stores Gemma's norm weights as 1 + weight already.
        config = dataclasses.replace(config, norm_weight_offset=0.0)
    return config


def _gemma_config(get: Any, arch: str, hf_config: dict[str, Any]) -> dict[str, Any]:
    """Gemma's keys that GGUF names its own way or leaves to the runtime."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    # An explicit attention scale wins (`{arch}.attention.scale`), else llama.cpp's rule.
    scale = get(f"{arch}.attention.scale")
    big = hf_config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
    scalar = scale ** -2 if scale else (hidden // heads if big else hf_config["head_dim"])
    # The pattern is every n-th layer global, or one flag per layer (true: sliding); absent,
    # the family's default (engine/families.py).
    pattern = get(f"{arch}.attention.sliding_window_pattern")
    layer_types = None
    if isinstance(pattern, list):
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "sliding_window_pattern": pattern if isinstance(pattern, int) else None,
            "layer_types": layer_types,
            "attn_logit_softcapping": get(f"{arch}.attn_logit_softcapping"),
            "final_logit_softcapping": get(f"{arch}.final_logit_softcapping")}


def _rope_scaling(get: Any, arch: str, tensors: dict[str, ReaderTensor], theta: float,
                  head_dim: int) -> dict[str, Any] | None:
    if _ROPE_FACTORS["long_factor"] in tensors:
        return {"rope_type": "longrope", "attention_factor": get(f"{arch}.rope.scaling.attn_factor"),
                "original_max_position_embeddings":
                    get(f"{arch}.rope.scaling.original_context_length"),
                **{key: _float_list(tensors[name]) for key, name in _ROPE_FACTORS.items()}}
    rope_freqs = tensors.get(_ROPE_FREQS)
    if rope_freqs is not None:
        divisors = dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1)
        scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_ROPE}
        expected = _llama3_rope_divisors(scaling, theta, head_dim)
        if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
            raise UnsupportedModelError(
                "this GGUF stores rope frequency factors (rope_freqs.weight) that are not "
                "Llama 3's rope scaling; load the original safetensors checkpoint instead"
            )
        return scaling
    kind = get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": get(f"{arch}.rope.scaling.factor")}
    original = get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _float_list(tensor: ReaderTensor) -> list[float]:
    return dequantize(tensor.data, tensor.tensor_type).reshape(-1).tolist()


def _llama3_rope_divisors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs: per frequency, inv_freq / scaled inv_freq.

    Returns [head_dim // 2] float32.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    old_len = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (old_len / wavelen - low) / (high - low)
    divisors = np.where(wavelen < old_len / high, 1.0,
                        np.where(wavelen > old_len / low, factor,
                                 1 / ((1 - smooth) / factor + smooth)))
    return divisors.astype(np.float32)


def _hf_name(gguf_name: str, arch: str, path: str) -> str | None:
    """The HF parameter name; None for tensors that are not parameters (rope factors)."""
    if gguf_name == _ROPE_FREQS or gguf_name in _ROPE_FACTORS.values():
        return None
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL and suffix == "weight":
        return f"{_TOP_LEVEL[stem]}.weight"
    m = _LAYER_TENSOR.match(gguf_name)
    per_layer = {**_PER_LAYER, **_PER_LAYER_BY_ARCH.get(arch, {})}
    if m and m.group(2) in per_layer:
        return f"model.layers.{m.group(1)}.{per_layer[m.group(2)]}.{m.group(3)}"
    if m and m.group(2) in _EXPERT_STACKS and m.group(3) == "weight":
        return f"model.layers.{m.group(1)}.mlp.experts.{{}}.{_EXPERT_STACKS[m.group(2)]}.weight"
    m = _EXPERT_TENSOR.match(gguf_name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    raise ModelLoadError(
        f"{path} has a tensor {gguf_name!r} that a Llama-family model does not use"
    )


def _weights(plan: list[tuple[ReaderTensor, str]], config: ModelConfig, path: str,
             keep_quantized: bool) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    # llama.cpp permutes Q and K only for the llama arch, Mixtral included (qwen2 and
    # qwen3moe keep HF's layout); K with the KV head count.
    permuted_heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads} \
        if config.architecture in ("LlamaForCausalLM", "MixtralForCausalLM") else {}
    for tensor, hf_name in tqdm(plan, desc="Loading weights", unit="tensor"):
        heads = permuted_heads.get(hf_name.split(".")[-2])
        # Experts stay dense: the fused MoE kernel (kernels/triton_moe.py) reads dense weights.
        if keep_quantized and hf_name.endswith("_proj.weight") and ".experts." not in hf_name \
                and tensor.tensor_type in gguf_blocks.FORMATS:
            w = gguf_blocks.blocks_to_weight(tensor.data, tensor.tensor_type)
            yield hf_name, w if heads is None else w.map_rows(lambda t: _unpermute_rope_rows(t, heads))
            continue
        try:
            w = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the installed "
                f"gguf package cannot dequantize ({e})"
            ) from e
        w = w.reshape([int(d) for d in reversed(tensor.shape)])
        if heads is not None:
            w = _unpermute_rope_rows(w, heads)
        if "{}" in hf_name:  # [experts, rows, cols]: one expert's matrix at a time
            yield from ((hf_name.format(e), torch.from_numpy(w[e].copy())) for e in range(w.shape[0]))
            continue
        # F32 tensors come back as read-only views of the memory-mapped file.
        yield hf_name, torch.from_numpy(w if w.flags.writeable else w.copy())


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows, which within each head interleaves the two
    rotary halves (r0, r_d/2, r1, r_d/2+1, ...); HF keeps them apart (r0..r_d/2-1, r_d/2..).

    w: [n_heads * head_dim, ...] (a weight, a bias or a plane of a QuantizedWeight; numpy or
    torch) -> same shape.
    """
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)
