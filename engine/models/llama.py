"""One decoder for every family: Llama 2/3/3.1, Mistral, Qwen2/2.5/3, Phi-3/3.5/4, Gemma 2/3,
OLMo 2, SmolLM2, and the mixture-of-experts Mixtral, Qwen3-MoE and OLMoE (engine/models/moe.py
stands in for the MLP).

Variants are ModelConfig fields (qkv bias, q/k norms, norm placement, GeGLU, soft-capping,
sliding-window layers, tied embeddings, rope scaling, GQA), not classes; engine/families.py
sets them per family.
The model runs on a flat batch of tokens (no padding): prefill chunks and decodes of many
sequences side by side, with K/V read from and written to the paged cache.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from wattserve.engine.config import ModelConfig
from wattserve.engine.models.moe import SparseMoeBlock, canonical_name, expected_expert_slots, expert_slot
from wattserve.engine.tensor_parallel import Shard
from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.dispatch import Ops
from wattserve.kernels.kv_format import LayerKVCache
from wattserve.kernels.rotary import HeadNorm, rope_cos_sin


class RMSNormWeight(nn.Module):
    """Holds a norm's weight under HF's parameter name; the ops apply it (fused with the add)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Attention(nn.Module):
    """Under tensor parallelism `cfg` holds this rank's heads (engine/tensor_parallel.py) and
    o_proj's partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, ops: Ops, sliding: bool, shard: Shard):
        super().__init__()
        self.ops, self.shard = ops, shard
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.attention_scale or cfg.head_dim**-0.5
        # Passed only when set: plain attention keeps the plain signature.
        variants = {"sliding_window": cfg.sliding_window if sliding else None, "softcap": cfg.attn_logit_softcap}
        self.variants = {k: v for k, v in variants.items() if v is not None}
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm, self.eps = cfg.qk_norm, cfg.rms_norm_eps
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNormWeight(cfg.head_dim if per_head else self.q_size)
            self.k_norm = RMSNormWeight(cfg.head_dim if per_head else self.kv_size)

    @property
    def input_weight(self):
        """The one weight that reads x (Ops.norm_before's next_weight)."""
        return self.qkv_proj.weight

    def forward(self, x, positions, cos_sin, kv_cache, meta: AttentionMetadata):
        """x: [num_tokens, hidden], or what Ops.norm_before made of it for input_weight;
        kv_cache: this layer's LayerKVCache."""
        qkv = self.ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "proj":
            q = self.ops.rms_norm(q, self.q_norm.weight, self.eps)
            k = self.ops.rms_norm(k, self.k_norm.weight, self.eps)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Per-head norms go to the rotary op, which fuses them into its kernel.
        head_norm = HeadNorm(self.q_norm.weight, self.k_norm.weight, self.eps) if self.qk_norm == "head" else None
        q = self.ops.rotary_write_kv(q, k, v, positions, cos_sin, kv_cache, meta, head_norm)
        o = self.ops.paged_attention(q, kv_cache, meta, self.scale, **self.variants)
        return self.shard.all_reduce(self.ops.linear(o.reshape(-1, self.q_size), self.o_proj.weight))


class MLP(nn.Module):
    """The gated MLP: SwiGLU, or GeGLU for Gemma. Any module with forward(x) -> x of the same
    shape, HF's parameter names under `mlp.` and an `input_weight` (the one weight that reads
    x, None where several do) can take its place (a mixture of experts). Under tensor
    parallelism down_proj's partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, ops: Ops, shard: Shard):
        super().__init__()
        self.ops, self.shard = ops, shard
        self.gelu_tanh = cfg.hidden_act == "gelu_tanh"
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    @property
    def input_weight(self):
        return self.gate_up_proj.weight

    def forward(self, x):
        gate_up = self.ops.linear(x, self.gate_up_proj.weight)
        return self.shard.all_reduce(self.ops.gated_linear(gate_up, self.down_proj.weight, self.gelu_tanh))


class DecoderLayer(nn.Module):
    """Norms where the family puts them (cfg.norm_placement), under HF's names:
    pre:      input_layernorm -> attn -> post_attention_layernorm -> mlp
    sandwich: input_layernorm -> attn -> post_attention_layernorm, then
              pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm
    post:     attn -> post_attention_layernorm, then mlp -> post_feedforward_layernorm
    Each norm before a block is fused with the residual add in front of it."""

    def __init__(self, cfg: ModelConfig, ops: Ops, layer: int, shard: Shard):
        super().__init__()
        self.ops, self.eps, self.placement = ops, cfg.rms_norm_eps, cfg.norm_placement
        sliding = cfg.sliding_window is not None and (cfg.sliding_layers is None or cfg.sliding_layers[layer])
        self.sliding = sliding
        self.self_attn = Attention(cfg, ops, sliding, shard)
        self.mlp = SparseMoeBlock(cfg, ops, shard) if cfg.num_experts else MLP(cfg, ops, shard)
        if self.placement != "post":
            self.input_layernorm = RMSNormWeight(cfg.hidden_size)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size)
        if self.placement != "pre":
            self.post_feedforward_layernorm = RMSNormWeight(cfg.hidden_size)
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = RMSNormWeight(cfg.hidden_size)

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta):
        """x + residual is the residual stream (residual None: x is, in the first layer);
        returns the same pair after this layer."""
        h, residual = self._before(x, residual, getattr(self, "input_layernorm", None), self.self_attn)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta)
        if self.placement == "pre":
            h, residual = self._before(h, residual, self.post_attention_layernorm, self.mlp)
        else:
            h = self.ops.rms_norm(h, self.post_attention_layernorm.weight, self.eps)
            h, residual = self._before(h, residual, getattr(self, "pre_feedforward_layernorm", None), self.mlp)
        h = self.mlp(h)
        if self.placement != "pre":
            h = self.ops.rms_norm(h, self.post_feedforward_layernorm.weight, self.eps)
        return h, residual

    def _before(self, x, residual, norm, block):
        """The block's input and the new residual stream, x + residual, normed when the block
        has a norm before it (in the form the block's input_weight takes best: Ops.norm_before)."""
        if norm is None:
            residual = x if residual is None else x + residual
            return residual, residual
        return self.ops.norm_before(x, residual, norm.weight, self.eps, block.input_weight)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, max_positions: int, shard: Shard = Shard()):
        """`cfg`: the shapes this rank holds (all of them on one rank; see `shard`)."""
        super().__init__()
        self.cfg, self.ops, self.shard = cfg, ops, shard
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Rounded to the weights' dtype, as HF does (Gemma: sqrt(hidden)).
        self.embedding_scale = torch.tensor(cfg.embedding_scale, dtype=self.embed_tokens.weight.dtype).item()
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, i, shard) for i in range(cfg.num_layers))
        self.norm = RMSNormWeight(cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer(
            "cos_sin",
            rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions),
            persistent=False,
        )
        # Gemma 3's sliding layers rotate with their own base (and no scaling).
        local = cfg.local_rope_theta
        self.register_buffer(
            "cos_sin_local",
            None if local is None else rope_cos_sin(cfg.head_dim, local, None, max_positions),
            persistent=False,
        )

    def forward(self, input_ids, positions, kv_caches: list[LayerKVCache], meta: AttentionMetadata):
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x, residual = self.shard.embed(self.embed_tokens.weight, input_ids), None
        if self.embedding_scale != 1.0:
            x = x * self.embedding_scale
        for layer, kv_cache in zip(self.layers, kv_caches):
            local = layer.sliding and self.cos_sin_local is not None
            cos_sin = self.cos_sin_local if local else self.cos_sin
            x, residual = layer(x, residual, positions, cos_sin, kv_cache, meta)
        x, _ = self.ops.add_rms_norm(x, residual, self.norm.weight, self.cfg.rms_norm_eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = self.shard.gather_vocab(self.ops.linear(hidden, weight)).float()
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    # ---- weights -----------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up into their stacked parameters
        (checkpoints that store them fused, as Phi-3's, fill every part at once)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            short = canonical_name(name.removeprefix("model."))
            slot = expert_slot(short, self.cfg)
            if slot is not None:  # one expert's projection: its rows of the stacked parameter
                target, expert, offset = slot
            else:
                target, part = _stacked_target(short)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            if slot is not None:
                param, part, offsets, filled = params[target].data[expert], 0, [offset], [f"{expert},{offset}"]
            else:
                param, offsets = params[target].data, _offsets(_parts(target, self.cfg))
                filled = offsets if part is None else [offsets[part]]
            dst = param if part is None else param.narrow(0, offsets[part], tensor.shape[0])
            if dst.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dst.shape)}")
            dst.copy_(tensor)
            if name.endswith("norm.weight"):
                dst.add_(self.cfg.norm_weight_offset)
            loaded.update(f"{target}@{o}" for o in filled)
        # Read again: quantized weights loaded beside this (engine/weight_loading.py) replace parameters.
        params = dict(self.named_parameters())
        expected = {f"{n}@{o}" for n in params if ".experts." not in n for o in _offsets(_parts(n, self.cfg))}
        expected |= {f"{n}@{e},{o}" for n in params if ".experts." in n
                     for e, o in expected_expert_slots(n, self.cfg)}
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


# HF's separate projections -> (our fused parameter, index of the part in it)
_STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _stacked_target(name: str) -> tuple[str, int | None]:
    for part, (fused, index) in _STACKED.items():
        if f".{part}." in name:
            return name.replace(part, fused), index
    return name, None


def _parts(param_name: str, cfg: ModelConfig) -> list[int]:
    """Row counts of the parts a parameter stacks; one part for an unstacked one."""
    if ".qkv_proj." in param_name:
        return [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    if ".gate_up_proj." in param_name:
        return [cfg.intermediate_size] * 2
    return [0]


def _offsets(parts: list[int]) -> list[int]:
    return [sum(parts[:i]) for i in range(len(parts))]
