"""Oracle: logits and greedy tokens against HF transformers on the same weights."""
import pytest
import torch

from wattserve.engine.config import CacheConfig, EngineConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.llm import prompt_logits
from wattserve.engine.loader import default_model_path
from wattserve.engine.request import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books about",
]


def greedy(engine, prompt_ids, n):
    # min_tokens = max_tokens masks EOS the way HF generate's min_new_tokens does.
    engine.add_request("r", prompt_ids, SamplingParams(temperature=0, max_tokens=n, min_tokens=n))
    out = []
    while engine.has_work():
        out += [t for o in engine.step() for s in o.outputs for t in s.token_ids]
    return out


def compare(engine, hf_model, tokenizer_encode):
    for text in PROMPTS:
        ids = tokenizer_encode(text)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
        ours = prompt_logits(engine, ids)
        # fp32 on both sides; only the order of float ops differs (fused projections, SDPA):
        # the error is a few ulps of the largest logits, far below any gap that decides a token.
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, f"{text!r}: max relative logit error {rel:.2e}"
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False)[0, len(ids):].tolist()
        assert greedy(engine, ids, 32) == want, f"greedy tokens differ for {text!r}"


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
