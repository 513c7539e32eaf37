"""The decoder families wattserve runs, and how each one's config.json maps to ModelConfig.

Every family is the one decoder of engine/models/llama.py; what differs is a handful of
ModelConfig fields, set here from the family's own config keys.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from wattserve.engine.config import UnsupportedModelError


def _qwen2(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": True}


def _qwen3(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": "head"}


def _mistral(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"sliding_window": cfg.get("sliding_window")}  # Mistral 7B v0.1: 4096


def _gemma2(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_gemma(cfg, every=2), "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
            "final_logit_softcap": cfg.get("final_logit_softcapping")}


def _gemma3(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 keeps one rope setting per layer type; older configs a local base.
    params = cfg.get("rope_parameters") or {}
    local = (params.get("sliding_attention") or {}).get("rope_theta") \
        or cfg.get("rope_local_base_freq") or 10000.0
    return {**_gemma(cfg, every=cfg.get("sliding_window_pattern") or 6), "qk_norm": "head",
            "local_rope_theta": float(local)}


def _gemma(cfg: dict[str, Any], every: int) -> dict[str, Any]:
    """Gemma 2 and 3: every `every`-th layer global, the others sliding, unless the config
    lists the layer types."""
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                       for i in range(layers)]
    hidden_act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"Gemma with activation {hidden_act!r} (gelu_pytorch_tanh is supported)")
    return {"norm_placement": "sandwich", "norm_weight_offset": 1.0, "hidden_act": "gelu_tanh",
            "embedding_scale": cfg["hidden_size"] ** 0.5,
            "attention_scale": cfg.get("query_pre_attn_scalar", cfg.get("head_dim", 256)) ** -0.5,
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
            "sliding_window": cfg.get("sliding_window"),
            "sliding_layers": [t == "sliding_attention" for t in types]}


def _olmo2(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": "proj", "norm_placement": "post"}


def _moe(cfg: dict[str, Any], renormalize: bool) -> dict[str, Any]:
    """The experts of Mixtral, Qwen3-MoE and OLMoE (engine/models/moe.py); `renormalize`: the
    top-k router weights are scaled to sum to 1 whatever the config says (Mixtral)."""
    if cfg.get("clip_qkv") is not None:
        raise UnsupportedModelError("clip_qkv (OLMoE variants that clamp q, k, v) is not supported")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError("MoE models with dense layers among the sparse ones "
                                    "(mlp_only_layers, decoder_sparse_step > 1) are not supported")
    return {
        "num_experts": cfg.get("num_experts") or cfg["num_local_experts"],
        "num_experts_per_tok": cfg["num_experts_per_tok"],
        # Mixtral's and OLMoE's experts are their intermediate_size; Qwen3-MoE names theirs apart.
        "moe_intermediate_size": cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
        "norm_topk_prob": renormalize or bool(cfg.get("norm_topk_prob", False)),
    }


# architecture -> the variant fields it sets beyond the shared ones
_FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "LlamaForCausalLM": lambda cfg: {},
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    # Phi-3, 3.5 and 4 checkpoints store q/k/v and gate/up already fused, as the model does.
    "Phi3ForCausalLM": lambda cfg: {"sliding_window": cfg.get("sliding_window")},
    "Gemma2ForCausalLM": _gemma2,
    "Gemma3ForCausalLM": _gemma3,
    "Olmo2ForCausalLM": _olmo2,
    "MixtralForCausalLM": lambda cfg: _moe(cfg, renormalize=True),
    "Qwen3MoeForCausalLM": lambda cfg: {**_moe(cfg, renormalize=False), "qk_norm": "head"},
    "OlmoeForCausalLM": lambda cfg: {**_moe(cfg, renormalize=False), "qk_norm": "proj"},
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                       "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                       "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                       "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                       "olmoe": "OlmoeForCausalLM"}


def model_config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's keyword arguments from an HF config.json's fields."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(cfg.get("model_type", ""), "")
    if arch not in _FAMILIES:
        raise UnsupportedModelError(
            f"architecture {arch or cfg.get('model_type', '?')!r} is not supported; "
            f"wattserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if float(cfg.get("partial_rotary_factor") or _rope_params(cfg).get("partial_rotary_factor")
             or 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1, as in "
                                    "Phi-4-mini) are not supported")
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    fields = dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(cfg),
        rope_scaling=_rope_scaling(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )
    return {**fields, **_FAMILIES[arch](cfg)}


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 moved rope settings into `rope_parameters` (Gemma 3: one per layer type;
    # these are the global layers'); older configs keep `rope_theta` and `rope_scaling`.
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return params.get("full_attention", params)


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = _rope_params(cfg)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind in ("su", "yarn") and "long_factor" in scaling:  # Phi-3's older names for longrope
        kind = "longrope"
    if kind == "default":
        return None
    if kind == "longrope":
        return _longrope(cfg, scaling)
    if kind not in ("llama3", "linear"):
        raise UnsupportedModelError(
            f"rope scaling {kind!r} is not supported (llama3, linear, longrope are)")
    return {**scaling, "rope_type": kind}


def _longrope(cfg: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's scaling with the attention factor resolved: when the config gives none, the
    LongRoPE paper's sqrt(1 + ln(s) / ln(original context)), s = the context's growth."""
    original = scaling.get("original_max_position_embeddings") \
        or cfg.get("original_max_position_embeddings")
    if original is None:
        raise UnsupportedModelError("longrope scaling needs original_max_position_embeddings")
    factor = scaling.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]),
            "original_max_position_embeddings": int(original),
            "attention_factor": float(attention_factor)}
