"""One rank's slices of the checkpoint's tensors, cut as they stream in (engine/tensor_parallel.py
says which rank holds what). Dense safetensors come unread (`load_checkpoint(sliced=True)`)
and only the slices are read from the file; GGUF and pre-quantized tensors are read whole
and sliced, the rest dropped before the next tensor is read.

Column-parallel weights (q/k/v, gate/up, the LM head and the embedding, whose rows are the
vocabulary) keep rows; row-parallel ones (o_proj, down_proj) keep input columns. Quantized
weights (kernels/weight_format.py) slice the same way: rows through every per-row plane,
columns along whole scale groups. A column cut through a group, or GPTQ act-order's permuted
columns, cannot stay quantized: that weight is dequantized (and logged).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from wattserve.engine.config import ModelConfig
from wattserve.engine.models.moe import canonical_name
from wattserve.engine.tensor_parallel import Shard, first_kv_head
from wattserve.kernels.weight_format import QuantizedWeight, dequantize

log = logging.getLogger("wattserve.engine")

Weight = torch.Tensor | QuantizedWeight
Ranges = list[tuple[int, int]]  # (start, length) pieces of one dimension, kept in order


def shard_weights(weights: Iterable[tuple[str, Any]] | None, cfg: ModelConfig,
                  shard: Shard) -> Iterable[tuple[str, Weight]] | None:
    """The (HF name, tensor or unread safetensors slice) stream of the full model `cfg` cut
    to `shard`'s slices."""
    if weights is None or shard.size == 1:
        return weights
    return _cut(weights, cfg, shard)


def _cut(weights: Iterable[tuple[str, Any]], cfg: ModelConfig, shard: Shard) -> Iterator[tuple[str, Weight]]:
    for name, w in weights:
        if not isinstance(w, (torch.Tensor, QuantizedWeight)):
            w = _Unread(w)
        part = _slice(canonical_name(name.removeprefix("model.")), w, cfg, shard)
        yield name, part.read() if isinstance(part, _Unread) else part


class _Unread:
    """A safetensors tensor not read yet (its PySafeSlice): reads what `narrow` or a row
    range asks for, or all of it."""

    def __init__(self, handle):
        self.handle = handle
        self.shape = torch.Size(handle.get_shape())
        self.ndim = len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * self.ndim
        index[dim] = slice(start, start + length)
        return self.handle[tuple(index)]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.handle[rows]

    def read(self) -> torch.Tensor:
        return self.handle[:]


def _slice(name: str, w: Weight, cfg: ModelConfig, shard: Shard) -> Weight:
    n, r = shard.size, shard.rank
    hd = cfg.head_dim
    q_rows = [(r * cfg.num_heads // n * hd, cfg.num_heads // n * hd)]
    kv_rows = [(first_kv_head(cfg, shard) * hd, max(1, cfg.num_kv_heads // n) * hd)]
    inter = cfg.moe_intermediate_size if ".experts." in name else cfg.intermediate_size
    mlp_rows = [(r * inter // n, inter // n)]
    q_size, kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
    if ".q_proj." in name:
        return _rows(w, q_rows)
    if ".k_proj." in name or ".v_proj." in name:
        return _rows(w, kv_rows)
    if ".qkv_proj." in name:  # fused (Phi-3): each part's own rows
        return _rows(w, q_rows + _shift(kv_rows, q_size) + _shift(kv_rows, q_size + kv_size))
    if ".o_proj." in name:
        return _columns(w, *q_rows[0], name)
    if ".gate_proj." in name or ".up_proj." in name:
        return _rows(w, mlp_rows)
    if name.endswith("gate_up_proj") or ".gate_up_proj." in name:  # fused: Phi-3, stacked experts
        return _rows(w, mlp_rows + _shift(mlp_rows, inter))
    if name.endswith("down_proj") or ".down_proj." in name:
        return _columns(w, *mlp_rows[0], name)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return _vocab_rows(w, shard)
    return w  # norms, routers, biases of replicated layers: every rank the whole


def _shift(ranges: Ranges, by: int) -> Ranges:
    return [(start + by, length) for start, length in ranges]


def _rows(w: Weight, ranges: Ranges) -> Weight:
    """Rows are the output dimension: dim 0 of a weight or bias, dim 1 of stacked experts
    [experts, out, in]."""
    if isinstance(w, QuantizedWeight):
        return w.map_rows(lambda t: _pieces(t, 0, ranges))
    return _pieces(w, 0 if w.ndim < 3 else 1, ranges)


def _pieces(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    return torch.cat([t.narrow(dim, start, length) for start, length in ranges], dim).contiguous()


def _columns(w: Weight, start: int, length: int, name: str) -> Weight:
    if not isinstance(w, QuantizedWeight):
        return w.narrow(-1, start, length).contiguous()
    one_group = w.group == w.in_features  # fp8's per-row scale: every column shares it
    if w.perm is not None or (not one_group and (start % w.group or length % w.group)):
        log.warning("%s (%s): dequantized to split its columns, which %s", name, w.source,
                    "are permuted (act-order)" if w.perm is not None else "a split would cut a scale group of")
        return dequantize(w).narrow(-1, start, length).contiguous()
    per_byte = 2 if w.kind == "u4" else 1
    codes = w.codes[:, start // per_byte : (start + length) // per_byte].contiguous()
    groups = slice(0, 1) if one_group else slice(start // w.group, (start + length) // w.group)
    offsets = None if w.offsets is None else w.offsets[:, groups].contiguous()
    return QuantizedWeight(w.kind, codes, w.scales[:, groups].contiguous(), length if one_group else w.group,
                           offsets, None, w.source)


def _vocab_rows(w: Weight, shard: Shard) -> torch.Tensor:
    """This rank's slice of the vocabulary, zero rows past its end (the vocabulary padded to
    a multiple of the ranks; those ids never occur and their logits are cut off)."""
    if isinstance(w, QuantizedWeight):  # embeddings and LM head run dense (engine/weight_loading.py)
        w = dequantize(w)
    vocab = w.shape[0]
    per_rank = -(-vocab // shard.size)
    start = min(shard.rank * per_rank, vocab)
    part = w[start : start + per_rank]
    if part.shape[0] == per_rank:
        return part.contiguous()
    return torch.cat([part, part.new_zeros(per_rank - part.shape[0], *part.shape[1:])])

