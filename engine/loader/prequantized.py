"""Pre-quantized safetensors checkpoints (config.json `quantization_config`) as QuantizedWeight.

- AWQ (quant_method "awq", GEMM packing): qweight [K, N/8] int32, eight 4-bit columns a word
  in the order 0 2 4 6 1 3 5 7; qzeros [K/G, N/8] packed the same; scales [K/G, N];
  weight = (q - zero) * scale.
- GPTQ (quant_method "gptq"): qweight [K/8, N] int32, eight consecutive input rows a word;
  qzeros [K/G, N/8]; scales [K/G, N]; g_idx [K], each input's group (act-order permutes
  them). AutoGPTQ's format stores zero - 1 ("gptq_v2" does not). group_size -1: one group a row.
- FP8 (quant_method "fp8" or "compressed-tensors" with float 8-bit weights): weight
  float8_e4m3fn [N, K] with weight_scale per tensor or per output channel; static input
  scales are ignored (activations are quantized per token at run time).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from wattserve.engine.loader import ModelLoadError
from wattserve.kernels.weight_format import QuantizedWeight, pack_u4

_AWQ_COLUMN_OF_NIBBLE = [0, 2, 4, 6, 1, 3, 5, 7]
_PIECES = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx"),
           "fp8": ("weight", "weight_scale")}
_IGNORED = ("input_scale", "weight_zero_point")


def quantization_config(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("quantization_config")


def quantized_weights(weights: Iterator[tuple[str, torch.Tensor]],
                      config: dict[str, Any] | None) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The checkpoint's tensors with each quantized linear's pieces gathered into one
    (prefix.weight, QuantizedWeight); other tensors pass through. Raises ModelLoadError now
    for a quantization method wattserve does not run."""
    if config is None:
        return weights
    method = _method(config)
    return _gather(weights, method, _PIECES[method], config)


def _gather(weights: Iterator[tuple[str, torch.Tensor]], method: str, pieces: tuple[str, ...],
            config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, piece = name.rpartition(".")
        if piece in _IGNORED:
            continue
        is_quantized = piece in pieces and (method != "fp8" or piece != "weight" or tensor.dtype == torch.float8_e4m3fn)
        if not is_quantized:
            yield name, tensor
            continue
        got = pending.setdefault(prefix, {})
        got[piece] = tensor
        if len(got) == len(pieces):
            yield f"{prefix}.weight", _build(method, pending.pop(prefix), config, name)
    if pending:
        raise ModelLoadError(f"quantized layers with missing pieces: {sorted(pending)[:3]}")


def _method(config: dict[str, Any]) -> str:
    method = config.get("quant_method")
    if method in ("awq", "gptq"):
        if config.get("bits", 4) != 4 or (method == "awq" and config.get("version", "gemm") != "gemm"):
            raise ModelLoadError(f"{method} checkpoints run with 4 bits and GEMM packing; this one has {config}")
        return method
    if method == "fp8" or (method == "compressed-tensors" and _is_fp8_compressed_tensors(config)):
        if config.get("weight_block_size"):
            raise ModelLoadError("block-wise FP8 checkpoints (weight_block_size) are not supported yet")
        return "fp8"
    raise ModelLoadError(f"quantization {method!r} is not supported; wattserve loads awq, gptq, fp8 "
                         "and compressed-tensors float8 checkpoints")


def _is_fp8_compressed_tensors(config: dict[str, Any]) -> bool:
    weights = [g.get("weights") or {} for g in (config.get("config_groups") or {}).values()]
    return bool(weights) and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)


def _build(method: str, got: dict[str, torch.Tensor], config: dict[str, Any], name: str) -> QuantizedWeight:
    if method == "fp8":
        w, scale = got["weight"], got["weight_scale"].float()
        scales = scale.reshape(-1, 1).expand(w.shape[0], 1).contiguous()  # per tensor: the same for every row
        return QuantizedWeight("fp8", w, scales, w.shape[1], source="fp8 checkpoint")
    scales = got["scales"]
    group = config.get("group_size", 128)
    if group == -1:  # one group per row
        group = got["qweight"].shape[0] * (8 if method == "gptq" else 1)  # K
    if method == "awq":
        codes = _unpack(got["qweight"])[:, :, _nibble_order()]
        codes = codes.reshape(codes.shape[0], -1).T  # [N, K]
        zeros = _unpack(got["qzeros"])[:, :, _nibble_order()].reshape(scales.shape)
        perm = None
    else:
        packed = got["qweight"]
        codes = _unpack(packed.T).reshape(packed.shape[1], -1)  # [N, K], input rows consecutive
        zeros = _unpack(got["qzeros"]).reshape(scales.shape) + (config.get("checkpoint_format") != "gptq_v2")
        codes, perm = _act_order(codes, got["g_idx"], group, name)
    scales = scales.T.contiguous()
    offsets = -(zeros.T.float() * scales.float())  # exact in float32: a 4-bit integer times a half
    return QuantizedWeight("u4", pack_u4(codes), scales, group, offsets, perm, source=f"{method} int4 g{group}")


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> [..., W, 8] nibbles, lowest first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (packed[..., None] >> shifts) & 15


def _nibble_order() -> list[int]:
    """For each of a word's eight columns, the nibble that holds it."""
    return [_AWQ_COLUMN_OF_NIBBLE.index(c) for c in range(8)]


def _act_order(codes: torch.Tensor, g_idx: torch.Tensor, group: int,
               name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPTQ act-order: columns sorted by group, so each group's columns are contiguous."""
    k = codes.shape[1]
    if torch.equal(g_idx.long(), torch.arange(k) // group):
        return codes, None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not (torch.bincount(g_idx.long()) == group).all():
        raise ModelLoadError(f"{name}: g_idx does not give every group {group} inputs")
    return codes[:, perm].contiguous(), perm
