"""Oracle: logits and greedy tokens against HF transformers on the same weights."""
import pytest
import torch

from hf_oracle import compare
from wattserve.engine.config import CacheConfig, EngineConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.loader import default_model_path


@pytest.fixture(scope="module")
def default_engine():
    return EngineCore(EngineConfig(cache=CacheConfig(kv_cache_memory=32 << 20)))


def test_default_gguf_model_matches_transformers(default_engine):
    from transformers import AutoModelForCausalLM
    import os

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    compare(default_engine, hf, lambda t: default_engine.tokenizer.encode(t, add_special_tokens=False))


def test_qwen2_safetensors_with_qkv_bias_matches_transformers(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    engine = EngineCore(EngineConfig(model=str(tiny_qwen2_dir), cache=CacheConfig(kv_cache_memory=8 << 20)))
    assert engine.model_config.attention_bias
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    compare(engine, hf, lambda t: engine.tokenizer.encode(t, add_special_tokens=False))
