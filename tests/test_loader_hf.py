"""Loading a sharded safetensors directory written by transformers, and the loader's errors."""
import json
import os
import types

import huggingface_hub.constants
import pytest
import torch

from wattserve.engine.config import UnsupportedModelError
from wattserve.engine.loader import ModelLoadError, load_checkpoint

QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e6,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tokenizer):
    """A tiny random Qwen2 in bfloat16, saved in 2 MB shards beside the default tokenizer;
    its generation config adds EOS id 5."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=tokenizer.vocab_size, **QWEN2))
    with torch.no_grad():
        for p in model.parameters():  # biases start at zero; make every tensor distinct
            p.normal_()
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="2MB")
    tokenizer.hf.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return str(directory), model.state_dict()


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_config(directory, **overrides):
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, **QWEN2, **overrides}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def test_sharded_checkpoint_loads_every_tensor(qwen2_dir):
    directory, state_dict = qwen2_dir
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in os.listdir(directory), \
        f"the fixture should be sharded, got {shards}"

    ckpt = load_checkpoint(directory)
    assert isinstance(ckpt.weights, types.GeneratorType), "weights must be produced lazily"
    weights = dict(ckpt.weights)
    assert sorted(weights) == sorted(state_dict)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16, f"{name}: the checkpoint's dtype must be kept"
        assert torch.equal(tensor, state_dict[name]), f"{name} differs from what was saved"
    for layer in range(QWEN2["num_hidden_layers"]):
        for proj in "qkv":
            assert f"model.layers.{layer}.self_attn.{proj}_proj.bias" in weights


def test_config_tokenizer_and_eos_ids(qwen2_dir, tokenizer):
    directory, _ = qwen2_dir
    ckpt = load_checkpoint(directory, load_format="dummy")
    cfg = ckpt.model_config
    assert ckpt.name == os.path.basename(directory) and ckpt.weights is None
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.attention_bias
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim) == (tokenizer.vocab_size, 64, 128, 2, 4, 2, 16)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings) == \
        (1e6, 512, False)
    assert cfg.torch_dtype == "bfloat16"
    # config.json says 2, generation_config.json adds 5, the tokenizer's <|im_end|> is 2
    assert cfg.eos_token_ids == [2, 5] == ckpt.tokenizer.eos_token_ids
    messages = [{"role": "user", "content": "hi"}]
    assert ckpt.tokenizer.render_chat(messages) == tokenizer.render_chat(messages)


def test_tokenizer_argument_overrides_the_model_directory(qwen2_dir, tmp_path):
    directory, _ = qwen2_dir
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes(open(os.path.join(directory, f), "rb").read())
    (other / "chat_template.jinja").write_text("{{ messages[0].content | upper }}")
    ckpt = load_checkpoint(directory, load_format="dummy", tokenizer=str(other))
    assert ckpt.tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "HI"


def test_dummy_without_tokenizer_borrows_the_default_one(qwen2_dir, tmp_path, monkeypatch):
    # Stand the saved copy of the default tokenizer in for the (10 s) GGUF one.
    monkeypatch.setattr("wattserve.engine.loader.default_model_path", lambda: qwen2_dir[0])
    config_path = os.path.join(write_config(tmp_path / "bare"), "config.json")
    ckpt = load_checkpoint(config_path, load_format="dummy")
    assert ckpt.weights is None and ckpt.model_config.vocab_size == 256
    assert ckpt.tokenizer.vocab_size == 49152 and ckpt.name == "bare"


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model.gguf",
                                  "no-such-model.gguf"])
def test_missing_path(path):
    with pytest.raises(ModelLoadError, match="model path .* does not exist"):
        load_checkpoint(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a directory with config"):
        load_checkpoint(str(tmp_path))


def test_directory_without_safetensors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors weights"):
        load_checkpoint(write_config(tmp_path / "bin-only"))


def test_unsupported_architecture(tmp_path):
    directory = write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_checkpoint(directory)


def test_unknown_load_format(tmp_path):
    with pytest.raises(ModelLoadError, match="load format 'pt'"):
        load_checkpoint(write_config(tmp_path / "m"), load_format="pt")


def test_hub_id_without_network(offline_hub):
    with pytest.raises(ModelLoadError, match=r"could not download wattserve-test/no-such-model "
                                             r"from the Hugging Face Hub \(no network\?\)"):
        load_checkpoint("wattserve-test/no-such-model")
