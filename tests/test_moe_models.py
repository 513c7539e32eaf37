"""Mixtral, Qwen3-MoE and OLMoE against HF transformers: tiny random checkpoints built here, loaded
from safetensors and from a GGUF written from the same weights in llama.cpp's layout."""
import functools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hf_oracle import PROMPTS, gguf_writer
from test_loader_gguf import llama_cpp_permute

from wattserve.engine.llm import LLM, prompt_logits
from wattserve.engine.request import SamplingParams

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # Mixtral always renormalizes its top-k router weights.
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    # Qwen3-MoE with norm_topk_prob off (the renormalizing path is Mixtral's), an explicit
    # head_dim unlike hidden / heads, and q/k norms.
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                      intermediate_size=128, head_dim=32, norm_topk_prob=False),
    # OLMoE: no renormalization, q/k norms over the whole projection.
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=48),
}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def build_tiny_moe(family, directory, tokenizer):
    """A random 2-layer `family` model saved as safetensors with the default tokenizer.

    Router weights are drawn wide (std 1) so that routing is decisive and uneven: a near tie
    between two experts' probabilities would make the chosen experts depend on float
    summation order on either side.
    """
    import transformers

    model_cls = getattr(transformers, ARCHITECTURES[family])
    config_cls = getattr(transformers, ARCHITECTURES[family].replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=tokenizer.vocab_size, **COMMON, **FAMILIES[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
            elif "norm" in name:  # ones at init: give the q/k and layer norms real work
                p.normal_(1.0, 0.2)
    model.eval().save_pretrained(directory)
    tokenizer.hf.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_moe(request, tmp_path_factory, tokenizer):
    """(family, checkpoint directory, HF model, HF greedy tokens of a prompt, memoized: the
    safetensors and GGUF tests share them)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = build_tiny_moe(request.param, directory, tokenizer)

    @functools.cache
    def greedy(ids):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                    do_sample=False)
        return out[0, len(ids):].tolist()

    return request.param, directory, hf_model, lambda ids: greedy(tuple(ids))


def prompt_ids(llm):
    return [llm.core.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS]


def assert_matches_transformers(llm, hf_model, hf_greedy):
    """Last-position logits of each prompt through the paged prefill, then 32 greedy tokens
    for all prompts in one batch (decode steps route several sequences' tokens together).

    fp32 on both sides, so only the order of float ops differs: the logit error is a few
    ulps of the largest logit, bounded at 1e-4 relative, far below any gap that decides a
    token or (with the wide routers of build_tiny_moe) an expert choice.
    """
    prompts = prompt_ids(llm)
    for ids in prompts:
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
        ours = prompt_logits(llm.core, ids)
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, f"max relative logit error {rel:.2e}"
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, min_tokens=32))
    assert [r.choices[0].token_ids for r in results] == [hf_greedy(ids) for ids in prompts]


def test_safetensors_matches_transformers(tiny_moe):
    family, directory, hf_model, hf_greedy = tiny_moe
    llm = LLM(str(directory), kv_cache_memory=8 << 20, warm_up=False)
    cfg = llm.core.model_config
    expected = FAMILIES[family]
    assert cfg.num_experts == expected.get("num_experts", expected.get("num_local_experts"))
    assert cfg.num_experts_per_tok == expected["num_experts_per_tok"]
    assert cfg.norm_topk_prob == (family == "mixtral")
    assert cfg.qk_norm == {"mixtral": None, "qwen3_moe": "head", "olmoe": "proj"}[family]
    assert_matches_transformers(llm, hf_model, hf_greedy)


def test_qwen3_moe_on_the_triton_kernels_matches_transformers(tiny_moe, monkeypatch):
    """The model as the CUDA path runs it (every Triton kernel, here interpreted, fp32): the
    per-head q/k norms inside the rotary kernel, decode attention merging its splits in its
    own launch, each token's experts summed in the down projection's launch."""
    family, directory, hf_model, hf_greedy = tiny_moe
    if family != "qwen3_moe":
        pytest.skip("Qwen3-MoE holds every fused path; the interpreter is slow")
    from wattserve.engine import model_runner
    from wattserve.kernels.dispatch import triton_ops
    from wattserve.kernels.triton_interpreter import fix_loop_bounds

    fix_loop_bounds()
    monkeypatch.setattr(model_runner, "ops_for", lambda device: triton_ops())
    llm = LLM(str(directory), kv_cache_memory=8 << 20, warm_up=False)
    assert llm.core.model_config.qk_norm == "head"
    # assert_matches_transformers' checks, shortened: the interpreter runs ~0.1 s a step.
    prompts = prompt_ids(llm)
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompts[0]])).logits[0, -1].float()
    rel = (prompt_logits(llm.core, prompts[0]) - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"max relative logit error {rel:.2e}"
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, min_tokens=8))
    assert [r.choices[0].token_ids for r in results] == [hf_greedy(ids)[:8] for ids in prompts]


# ---- GGUF: the same weights in llama.cpp's names, stacked experts and metadata ------------

def write_moe_gguf(path, family, hf_model, stacked=True):
    """What llama.cpp's convert_hf_to_gguf.py writes for these models, in F32: Mixtral as
    arch "llama" with Q/K rows permuted, the others under their names; experts stacked per
    layer, or (stacked=False) one tensor per expert as converters before 2024 wrote Mixtral."""
    cfg = hf_model.config
    arch = GGUF_ARCH[family]
    w = gguf_writer(path, arch, cfg)
    w.add_expert_count(cfg.num_local_experts if family == "mixtral" else cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if family == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        layer = lambda n: state[f"model.layers.{i}.{n}"]  # noqa: E731
        q, k = layer("self_attn.q_proj.weight"), layer("self_attn.k_proj.weight")
        if arch == "llama":
            q, k = llama_cpp_permute(q, cfg.num_attention_heads), llama_cpp_permute(k, cfg.num_key_value_heads)
        gate_up, down = layer("mlp.experts.gate_up_proj"), layer("mlp.experts.down_proj")
        gate, up = np.split(gate_up, 2, axis=1)
        blk = {"attn_q": q, "attn_k": k, "attn_v": layer("self_attn.v_proj.weight"),
               "attn_output": layer("self_attn.o_proj.weight"),
               "attn_norm": layer("input_layernorm.weight"),
               "ffn_norm": layer("post_attention_layernorm.weight"),
               "ffn_gate_inp": layer("mlp.gate.weight"),
               **({"ffn_gate_exps": gate, "ffn_up_exps": up, "ffn_down_exps": down} if stacked else
                  {f"ffn_{proj}.{e}": x[e] for proj, x in (("gate", gate), ("up", up), ("down", down))
                   for e in range(x.shape[0])})}
        if family != "mixtral":
            blk |= {"attn_q_norm": layer("self_attn.q_norm.weight"),
                    "attn_k_norm": layer("self_attn.k_norm.weight")}
        tensors |= {f"blk.{i}.{n}.weight": x for n, x in blk.items()}
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x), raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip_matches_transformers(tiny_moe, tmp_path):
    family, directory, hf_model, hf_greedy = tiny_moe
    path = tmp_path / f"{family}.gguf"
    write_moe_gguf(path, family, hf_model)
    llm = LLM(str(path), tokenizer=str(directory), kv_cache_memory=8 << 20, warm_up=False)
    cfg = llm.core.model_config
    assert cfg.architecture == ARCHITECTURES[family]
    assert cfg.norm_topk_prob == (family == "mixtral")
    assert cfg.moe_intermediate_size == {"mixtral": 96, "qwen3_moe": 32, "olmoe": 48}[family]
    assert cfg.head_dim == (32 if family == "qwen3_moe" else 16)
    assert_matches_transformers(llm, hf_model, hf_greedy)


def test_dense_layers_among_sparse_ones_are_refused():
    from wattserve.engine.config import ModelConfig, UnsupportedModelError

    config = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "intermediate_size": 64,
              "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
              "mlp_only_layers": [1], **COMMON}
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        ModelConfig.from_hf(config)
    config = {**config, "mlp_only_layers": []}
    assert ModelConfig.from_hf(config).num_experts == 4


def test_moe_block_on_the_triton_kernels_equals_the_reference():
    """The block as the CUDA path runs it (Triton routing and experts, here interpreted)
    against the CPU path, with routing as uneven as a trained router's."""
    from dataclasses import replace

    from wattserve.engine.config import ModelConfig
    from wattserve.engine.models.moe import SparseMoeBlock
    from wattserve.kernels.dispatch import REFERENCE_OPS, triton_ops
    from wattserve.kernels.triton_moe import fused_moe_triton

    cfg = ModelConfig("Qwen3MoeForCausalLM", 32, 48, 0, 1, 4, 2, 12, num_experts=16,
                      num_experts_per_tok=4, moe_intermediate_size=24, norm_topk_prob=True)
    # float32: the routing's matmul is torch's, its top-k the Triton kernel (route_triton, the
    # half-precision decode path, has its own test in tests/test_triton_moe.py).
    ops = replace(REFERENCE_OPS, route=triton_ops().route, fused_moe=fused_moe_triton)
    reference, fused = SparseMoeBlock(cfg, REFERENCE_OPS), SparseMoeBlock(cfg, ops)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.3)
        reference.gate.weight[:3] += 1.0  # three popular experts
    fused.load_state_dict(reference.state_dict())
    for tokens in (1, 5, 40):  # one tile per assignment, then sorted tiles
        x = torch.randn(tokens, 48)
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)


def test_per_expert_gguf_tensors_load_like_stacked_ones(tmp_path, tokenizer):
    """Only Mixtral GGUFs were written with one tensor per expert."""
    from wattserve.engine.loader.gguf import read_gguf

    family = "mixtral"
    hf_model = build_tiny_moe(family, tmp_path / "hf", tokenizer)

    write_moe_gguf(tmp_path / "stacked.gguf", family, hf_model)
    write_moe_gguf(tmp_path / "per-expert.gguf", family, hf_model, stacked=False)
    (cfg, stacked), (legacy_cfg, legacy) = (read_gguf(str(tmp_path / f)) for f in ("stacked.gguf", "per-expert.gguf"))
    stacked, legacy = dict(stacked), dict(legacy)
    assert legacy_cfg == cfg and sorted(legacy) == sorted(stacked)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in legacy
    for name, tensor in stacked.items():
        assert torch.equal(legacy[name], tensor), name
