"""The Llama family in one model: Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2.

Variants are ModelConfig fields (qkv bias, tied embeddings, rope scaling, GQA), not classes.
The model runs on a flat batch of tokens (no padding): prefill chunks and decodes of many
sequences side by side, with K/V read from and written to the paged cache.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from wattserve.engine.config import ModelConfig
from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.dispatch import Ops
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.rotary import rope_cos_sin


class RMSNormWeight(nn.Module):
    """Holds a norm's weight under HF's parameter name; the ops apply it (fused with the add)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, positions, cos_sin, kv_cache, meta: AttentionMetadata):
        """x: [num_tokens, hidden]; kv_cache: this layer's LayerKVCache."""
        qkv = self.ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q = self.ops.rotary_write_kv(q, k, v, positions, cos_sin, kv_cache, meta)
        o = self.ops.paged_attention(q, kv_cache, meta, self.scale)
        return self.ops.linear(o.reshape(-1, self.q_size), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        h = self.ops.silu_and_mul(self.ops.linear(x, self.gate_up_proj.weight))
        return self.ops.linear(h, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.ops, self.eps = ops, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNormWeight(cfg.hidden_size)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size)

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta):
        if residual is None:
            residual = x
            h = self.ops.rms_norm(x, self.input_layernorm.weight, self.eps)
        else:
            h, residual = self.ops.add_rms_norm(x, residual, self.input_layernorm.weight, self.eps)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta)
        h, residual = self.ops.add_rms_norm(h, residual, self.post_attention_layernorm.weight, self.eps)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, max_positions: int):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNormWeight(cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer(
            "cos_sin",
            rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions),
            persistent=False,
        )

    def forward(self, input_ids, positions, kv_caches: list[LayerKVCache], meta: AttentionMetadata):
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin, kv_cache, meta)
        x, _ = self.ops.add_rms_norm(x, residual, self.norm.weight, self.cfg.rms_norm_eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.ops.linear(hidden, weight).float()

    # ---- weights -----------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up into their stacked parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, offset = _stacked_target(name.removeprefix("model."), self.cfg)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target].data
            dst = param if offset is None else param.narrow(0, offset, tensor.shape[0])
            if dst.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{target}@{offset}")
        # Read again: quantized weights loaded beside this (engine/weight_loading.py) replace parameters.
        expected = {f"{n}@{o}" for n, o in _expected_slots(self.cfg, dict(self.named_parameters()))}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def init_random(self, seed: int) -> None:
        """Random weights at the config's shapes (`--load-format dummy`), scaled so
        activations stay finite through many layers."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=gen)


def _stacked_target(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for part, fused, offset in (
        ("q_proj", "qkv_proj", 0), ("k_proj", "qkv_proj", q), ("v_proj", "qkv_proj", q + kv),
        ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", inter),
    ):
        if f".{part}." in name:
            return name.replace(part, fused), offset
    return name, None


def _expected_slots(cfg: ModelConfig, params: dict) -> Iterable[tuple[str, int | None]]:
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for n in params:
        if n.endswith("qkv_proj.weight") or n.endswith("qkv_proj.bias"):
            yield from ((n, o) for o in (0, q, q + kv))
        elif n.endswith("gate_up_proj.weight"):
            yield from ((n, o) for o in (0, inter))
        else:
            yield n, None
