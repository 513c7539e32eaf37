"""Weights into the model in the format they run in (`--quantization`).

The checkpoint's quantized linears (GGUF blocks, AWQ, GPTQ, FP8) arrive as QuantizedWeight;
`auto` keeps them quantized where kernels/dispatch.py says that is faster (CUDA) and
dequantizes them at load elsewhere (CPU). `fp8` and `int4` quantize the dense linears after
loading, as vLLM's `--quantization fp8` does: the peak is the dense model, what stays is the
quantized one. Embeddings, norms and the LM head stay dense. A quantized weight replaces the
layer's `weight` parameter by a QuantizedWeight module, which `ops.linear` dispatches on, so
the model's code does not change with the format.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from wattserve.engine.models.llama import _stacked_target
from wattserve.kernels.dispatch import keeps_weights_quantized
from wattserve.kernels.weight_format import (
    QuantizedParts,
    QuantizedWeight,
    dequantize,
    quantize_fp8,
    quantize_int4,
    stack,
)

log = logging.getLogger("wattserve.engine")

QUANTIZATIONS = ("auto", "checkpoint", "none", "fp8", "int4")
INT4_GROUP = 128


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]] | None,
                 quantization: str, device: torch.device, seed: int = 0) -> None:
    """Fill `model` from `weights` (None: random weights from `seed`) in the format that
    `quantization` asks for; see the module docstring for its values."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if weights is None:
        model.init_random(seed)
    else:
        keep = quantization == "checkpoint" or (quantization != "none" and keeps_weights_quantized(device))
        stacker = _Stacker(model, device)
        model.load_weights(stacker.divert(weights, keep))
        stacker.check_complete()
    if quantization in ("fp8", "int4"):
        quantize_linears(model, quantization)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the dense weights replaced: the KV cache is sized from what is free
    log.info("weight formats: %s", " | ".join(f"{k} {v}" for k, v in weight_formats(model).items()))


def weight_formats(model: nn.Module) -> dict[str, str]:
    """Each layer type's weight format, e.g. {"qkv_proj": "gguf Q4_1", "embed_tokens": "float32"}."""
    formats: dict[str, set[str]] = defaultdict(set)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantizedParts):
            formats[name.rsplit(".", 1)[-1]].add(" + ".join(p.source for p in weight))
        elif isinstance(weight, QuantizedWeight):
            formats[name.rsplit(".", 1)[-1]].add(weight.source)
        elif isinstance(weight, torch.Tensor):
            formats[name.rsplit(".", 1)[-1]].add(str(weight.dtype).removeprefix("torch."))
    return {k: ", ".join(sorted(v)) for k, v in formats.items() if not k.endswith("norm")}


class _Stacker:
    """Collects the quantized parts of each stacked linear (q/k/v into qkv_proj, gate/up into
    gate_up_proj) and installs the whole once every row has arrived."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.parts: dict[str, list[tuple[int, QuantizedWeight]]] = defaultdict(list)

    def divert(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
               keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """The dense stream for model.load_weights; quantized weights are kept or dequantized."""
        for name, w in weights:
            if not isinstance(w, QuantizedWeight):
                yield name, w
            elif keep:
                self._add(name, w)
            else:
                yield name, dequantize(w)

    def _add(self, name: str, w: QuantizedWeight) -> None:
        target, part = _stacked_target(name.removeprefix("model."))
        try:
            rows = self.model.get_parameter(target).shape[0]
        except AttributeError as e:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model") from e
        self.parts[target].append((part or 0, w.to(self.device)))
        if sum(p.out_features for _, p in self.parts[target]) == rows:
            parts = [p for _, p in sorted(self.parts.pop(target), key=lambda ip: ip[0])]
            module = self.model.get_submodule(target.removesuffix(".weight"))
            if w.in_features != module.weight.shape[1]:
                raise ValueError(f"{name}: checkpoint shape {tuple(w.shape)} does not fit {target}")
            _replace_weight(module, stack(parts))

    def check_complete(self) -> None:
        if self.parts:
            raise ValueError(f"checkpoint lacks parts of the stacked weights {sorted(self.parts)}")


def quantize_linears(model: nn.Module, quantization: str) -> None:
    """The decoder layers' dense linears quantized in place: fp8 per channel, or int4 RTN in
    groups of 128 (of 64 where the input size is no multiple of 128)."""
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if ".layers." in f".{name}" and name.endswith("_proj") and isinstance(weight, nn.Parameter):
            w = weight.data
            # SmolLM2's hidden size 576 is no multiple of 128: such layers take groups of 64.
            _replace_weight(module, quantize_fp8(w) if quantization == "fp8"
                            else quantize_int4(w, math.gcd(w.shape[1], INT4_GROUP)))


def _replace_weight(linear: nn.Module, weight: QuantizedWeight | QuantizedParts) -> None:
    del linear.weight  # a parameter's name takes only a parameter: free it first
    linear.weight = weight
