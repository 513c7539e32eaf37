"""Tiny random HF checkpoints of each family and the comparisons against transformers."""
from __future__ import annotations

import torch

from wattserve.engine.llm import prompt_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books about",
]
# Shared by every family: small enough that building, saving and loading take well under a
# second, with GQA (4 query heads on 2 KV heads).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def save_tiny(model_cls, config, directory, tokenizer, seed: int = 0):
    """Random weights, saved as float32 safetensors beside the default tokenizer.

    transformers' init (std 0.02, norms at their neutral value) gives near-uniform logits on
    which greedy ties are likely; weights of std 0.15 and norms moved off neutral make every
    tensor count and keep the top logits apart.
    """
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    tokenizer.hf.save_pretrained(directory)
    return model.eval()


def hf_greedy(model, ids: list[int], n: int = 32) -> list[int]:
    """transformers' greedy tokens, computed once per model and prompt (the engine, GGUF and
    server tests all compare against them)."""
    cache = model.__dict__.setdefault("_greedy_tokens", {})
    key = (tuple(ids), n)
    if key not in cache:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        cache[key] = out[0, len(ids):].tolist()
    return cache[key]


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def engine_greedy(engine, prompt_ids: list[int], n: int = 32) -> list[int]:
    from wattserve.engine.request import SamplingParams

    # min_tokens = max_tokens masks EOS the way HF generate's min_new_tokens does.
    engine.add_request("r", prompt_ids, SamplingParams(temperature=0, max_tokens=n, min_tokens=n))
    out = []
    while engine.has_work():
        out += [t for o in engine.step() for s in o.outputs for t in s.token_ids]
    return out


def compare(engine, hf_model, encode, rel_bound: float = 1e-4, greedy: bool = True):
    """fp32 on both sides; only the order of float ops differs (fused projections, SDPA over
    the paged cache): the error is a few ulps of the largest logits, far below any gap that
    decides a token. `greedy`: also 32 greedy tokens each."""
    for text in PROMPTS:
        ids = encode(text)
        ref, ours = hf_last_logits(hf_model, ids), prompt_logits(engine, ids)
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < rel_bound, f"{text!r}: max relative logit error {rel:.2e}"
        if greedy:
            assert engine_greedy(engine, ids) == hf_greedy(hf_model, ids), \
                f"greedy tokens differ for {text!r}"


def gguf_writer(path, arch: str, cfg):
    """A GGUFWriter with the shape metadata every family shares, from an HF config."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = cfg.rope_parameters  # Gemma 3: one per layer type; the global layers' here
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w


def write_gguf(model, path, arch: str, extra_tensors=(), metadata=(), norm_offset: float = 0.0) -> str:
    """The model's weights as float32 GGUF tensors under llama.cpp's names, as gguf-py maps
    them, with the metadata keys llama.cpp's converter writes; no tokenizer (tests pass the
    checkpoint directory as --tokenizer). `extra_tensors`: (gguf name, array) written as
    they are; `metadata`: callables on the writer; `norm_offset` added to every norm weight
    (llama.cpp's Gemma converter stores 1 + weight)."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    w = gguf_writer(path, arch, cfg)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for add in metadata:
        add(w)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:  # the embedding's, again
            continue
        stem, _, suffix = name.rpartition(".")
        if name.endswith("norm.weight"):
            tensor = tensor + norm_offset
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", tensor.float().numpy())
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
