"""Weights loaded in the format they run in: the default GGUF executed quantized (the
reference path, forced on CPU) against the same engine with its weights dequantized, and
`--quantization fp8 / int4` at load against the model with the dequantized weights."""
import pytest
import torch
from hf_oracle import engine_greedy as greedy
from torch import nn

from wattserve.engine.config import CacheConfig, EngineConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.llm import prompt_logits
from wattserve.engine.weight_loading import weight_formats
from wattserve.kernels.weight_format import QuantizedParts, QuantizedWeight, dequantize, weight_bytes

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def engine(quantization, model=None):
    # No prefix caching: the second run of a prompt must recompute its KV with the new weights.
    return EngineCore(EngineConfig(model=model, quantization=quantization, warm_up=False,
                                   cache=CacheConfig(kv_cache_memory=16 << 20, enable_prefix_caching=False)))


def dequantize_in_place(model: nn.Module) -> None:
    for module in list(model.modules()):
        w = getattr(module, "weight", None)
        if isinstance(w, (QuantizedWeight, QuantizedParts)):
            parts = list(w) if isinstance(w, QuantizedParts) else [w]
            del module.weight
            module.weight = nn.Parameter(torch.cat([dequantize(p) for p in parts]))


def test_default_gguf_runs_quantized_with_the_dequantized_greedy_tokens():
    core = engine("checkpoint")
    assert {weight_formats(core.runner.model)[k] for k in LINEARS} == {"gguf Q4_1"}
    quantized_bytes = weight_bytes(core.runner.model)
    ids = core.tokenizer.encode("The capital of France is", add_special_tokens=False)
    tokens = greedy(core, ids, 6)  # the reference dequantizes every weight at every step: slow
    dequantize_in_place(core.runner.model)
    assert greedy(core, ids, 6) == tokens
    # Q4_1: 5 bits a weight against float32's 32; the float32 embedding is shared by both.
    dense_linears = weight_bytes(core.runner.model) - quantized_bytes
    assert dense_linears > 0.8 * (32 - 5) / 32 * 4 * 106e6


@pytest.mark.parametrize("quantization,source,bound", [
    # Weight-only: the model computes with exactly the dequantized weights; only summation
    # order differs.
    ("int4", "int4 RTN g128", 1e-4),
    # W8A8: activations rounded to e4m3 (<= 2^-4 relative each) on top; through 3 layers the
    # logits move by a few percent of their range.
    ("fp8", "fp8 per-channel", 0.1),
])
def test_quantization_at_load_matches_its_dequantized_weights(tiny_qwen2_dir, quantization, source, bound):
    core = engine(quantization, str(tiny_qwen2_dir))
    assert {weight_formats(core.runner.model)[k] for k in LINEARS} == {source}
    assert not isinstance(core.runner.model.lm_head.weight, QuantizedWeight)
    ids = core.tokenizer.encode("Once upon a time, in a land far away", add_special_tokens=False)
    quantized = prompt_logits(core, ids)
    dequantize_in_place(core.runner.model)
    dense = prompt_logits(core, ids)
    rel = ((quantized - dense).abs().max() / dense.abs().max()).item()
    assert rel < bound, f"max relative logit error {rel:.2e}"
