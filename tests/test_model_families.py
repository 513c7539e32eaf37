"""Each family beyond Llama, from a tiny random checkpoint built with transformers: logits
and 32 greedy tokens against transformers, from safetensors and from GGUF."""
import os

import pytest
from transformers import AutoTokenizer

from conftest import LiveServer
from hf_oracle import PROMPTS, TINY, compare, hf_greedy, save_tiny, write_gguf
from test_engine_batching import assert_all_blocks_free
from test_prefix_cache import GREEDY, SYSTEM, HitCounter, overlapping_prompts, run_in_waves
from wattserve.engine.config import CacheConfig, EngineConfig
from wattserve.engine.core import EngineCore
from wattserve.kernels.kv_format import KV_CACHE_DTYPES


# The end of Qwen3's chat template: `enable_thinking: false` pre-fills an empty think block.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32 is not hidden / heads (16): Qwen3 states it explicitly.
    config = Qwen3Config(**TINY, head_dim=32, max_position_embeddings=512)
    return dict(model_cls=Qwen3ForCausalLM, config=config, template=QWEN3_TEMPLATE)


def phi3():
    """Longrope, every prompt and its 32 tokens inside the original context of 64 (where
    transformers and we agree; past it see kernels/rotary.py and test_rotary_norm.py)."""
    import numpy as np
    from transformers import Phi3Config, Phi3ForCausalLM

    short = [1.0 + i / 8 for i in range(8)]  # head_dim 16: 8 rotary frequencies
    long = [1.5 + i for i in range(8)]
    config = Phi3Config(**TINY, max_position_embeddings=256, original_max_position_embeddings=64,
                        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    return dict(model_cls=Phi3ForCausalLM, config=config, gguf_tensors=[
        ("rope_factors_long.weight", np.array(long, np.float32)),
        ("rope_factors_short.weight", np.array(short, np.float32))],
        gguf_metadata=[lambda w: w.add_rope_scaling_orig_ctx_len(64)])


# Gemma 2's template refuses a system message.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# One sliding layer (window 8, shorter than every prompt) and one global; a query scale
# that is not head_dim ** -0.5; caps low enough to bend the scores and logits.
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)


# llama.cpp writes no query_pre_attn_scalar; an explicit attention scale stands in for it.
GEMMA_GGUF = [lambda w: w.add_sliding_window(8), lambda w: w.add_attention_scale(24**-0.5),
              lambda w: w.add_sliding_window_pattern([True, False])]


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**{**TINY, "tie_word_embeddings": True}, **GEMMA,
                          attn_logit_softcapping=5.0, final_logit_softcapping=2.0)
    return dict(model_cls=Gemma2ForCausalLM, config=config, template=GEMMA_TEMPLATE, gguf_norm_offset=1.0,
                gguf_metadata=[*GEMMA_GGUF, lambda w: w.add_attn_logit_softcapping(5.0),
                               lambda w: w.add_final_logit_softcapping(2.0)])


def gemma3():
    """Local layers on base 1e4, global ones on 1e6 with linear scaling by 8."""
    import gguf
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    config = Gemma3TextConfig(**{**TINY, "tie_word_embeddings": True}, **GEMMA, rope_parameters=rope)
    return dict(model_cls=Gemma3ForCausalLM, config=config, gguf_norm_offset=1.0,
                gguf_metadata=[*GEMMA_GGUF, lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                               lambda w: w.add_rope_scaling_factor(8.0)])


def olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return dict(model_cls=Olmo2ForCausalLM, config=Olmo2Config(**TINY, max_position_embeddings=512))


FAMILIES = {"qwen3": qwen3, "phi3": phi3, "gemma2": gemma2, "gemma3": gemma3, "olmo2": olmo2}


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory, tokenizer):
    """(family, directory, HF model in fp32)."""
    family = FAMILIES[request.param]()
    family["config"].vocab_size = tokenizer.vocab_size
    directory = tmp_path_factory.mktemp(request.param)
    model = save_tiny(family["model_cls"], family["config"], directory, tokenizer)
    if family.get("template") is not None:
        (directory / "chat_template.jinja").write_text(family["template"])
    return request.param, str(directory), model, family


def engine_for(model: str, **cache) -> EngineCore:
    return EngineCore(EngineConfig(model=model, warm_up=False,
                                   cache=CacheConfig(kv_cache_memory=8 << 20, **cache)))


def test_safetensors_logits_match_transformers(checkpoint):
    """The greedy tokens of these weights are checked through the server below."""
    _, directory, hf_model, _ = checkpoint
    engine = engine_for(directory)
    compare(engine, hf_model, lambda t: engine.tokenizer.encode(t, add_special_tokens=False), greedy=False)


def test_gguf_logits_and_greedy_tokens_match_transformers(checkpoint, tmp_path):
    name, directory, hf_model, family = checkpoint
    path = write_gguf(hf_model, tmp_path / f"{name}.gguf", name, family.get("gguf_tensors", ()),
                      family.get("gguf_metadata", ()), family.get("gguf_norm_offset", 0.0))
    engine = EngineCore(EngineConfig(model=path, tokenizer=directory, warm_up=False,
                                     cache=CacheConfig(kv_cache_memory=8 << 20)))
    compare(engine, hf_model, lambda t: engine.tokenizer.encode(t, add_special_tokens=False))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`wattserve serve <checkpoint directory>`, one per family."""
    name, directory, _, _ = checkpoint
    live = LiveServer(("--no-warm-up", directory), tmp_path_factory.mktemp(f"{name}-server") / "log")
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def test_completions_greedy_tokens_match_transformers_generate(checkpoint, server):
    from openai import OpenAI

    _, directory, hf_model, _ = checkpoint
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    tok = AutoTokenizer.from_pretrained(directory)
    for text in PROMPTS:
        ids = tok.encode(text, add_special_tokens=False)
        want = hf_greedy(hf_model, ids)
        got = client.completions.create(model=os.path.basename(directory), prompt=ids, max_tokens=32, temperature=0,
                                        extra_body={"min_tokens": 32})
        assert got.usage.completion_tokens == 32
        assert got.choices[0].text == tok.decode(want, skip_special_tokens=True), \
            f"greedy text differs for {text!r}"


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}, {"enable_thinking": True}])
def test_chat_template_kwargs_reach_the_template(checkpoint, server, kwargs):
    """Prompt tokens of a chat request are the template rendered by transformers with the
    same variables (Qwen3: `enable_thinking: false` adds an empty think block)."""
    from openai import OpenAI

    _, directory, _, _ = checkpoint
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    tok = AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "user", "content": "Hi there"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=False, **(kwargs or {}))
    got = client.chat.completions.create(
        model=os.path.basename(directory), messages=messages, max_tokens=1,
        extra_body={} if kwargs is None else {"chat_template_kwargs": kwargs})
    assert got.usage.prompt_tokens == len(want)


def test_chat_template_kwargs_may_not_replace_the_servers_own_variables(checkpoint, server):
    from openai import BadRequestError, OpenAI

    _, directory, _, _ = checkpoint
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(
            model=os.path.basename(directory), messages=[{"role": "user", "content": "Hi"}],
            extra_body={"chat_template_kwargs": {"messages": []}})
    assert err.value.body["param"] == "chat_template_kwargs"
    assert "messages" in err.value.body["message"]


def test_a_system_message_renders_as_transformers_renders_it_or_is_a_400(checkpoint, server):
    """Gemma 2's template refuses a system role: the template's own message comes back as a
    400 on `messages`; the others render it as transformers does."""
    import jinja2
    from openai import BadRequestError, OpenAI

    _, directory, _, _ = checkpoint
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    tok = AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    try:
        want = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    except jinja2.TemplateError as e:
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model=os.path.basename(directory), messages=messages)
        assert err.value.body["param"] == "messages" and str(e) in err.value.body["message"]
        return
    got = client.chat.completions.create(model=os.path.basename(directory), messages=messages,
                                         max_tokens=1)
    assert got.usage.prompt_tokens == len(want)


@pytest.fixture(scope="module")
def gemma2_checkpoint(tmp_path_factory, tokenizer):
    """Gemma 2 alone: sliding window, soft-capping and sandwich norms, the most that differs
    from Llama in one family."""
    family = gemma2()
    family["config"].vocab_size = tokenizer.vocab_size
    directory = tmp_path_factory.mktemp("gemma2-kv")
    return str(directory), save_tiny(family["model_cls"], family["config"], directory, tokenizer)


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
def test_every_kv_dtype_with_prefix_caching_gives_the_tokens_computed_without_it(gemma2_checkpoint,
                                                                                 kv_cache_dtype):
    """Overlapping prompts (a shared prefix cut mid-block, longer than the window), one at a
    time, with and without the prefix cache: the same greedy tokens and some hits; in the
    model dtype also transformers' tokens. One at a time because a quantized code depends on
    what else is batched (test_prefix_cache.py)."""
    directory, hf_model = gemma2_checkpoint
    cached, plain = (engine_for(directory, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=on)
                     for on in (True, False))
    counter = HitCounter()
    cached.observers[:] = [counter]
    # The whole prefix, a cut inside a block twice, the first prompt again: hits for every
    # block size (KIVI's 64 only from the repeat).
    prompts = [overlapping_prompts(cached, SYSTEM + " " + SYSTEM)[i] for i in (0, 2, 3, 8)]
    tokens = run_in_waves(cached, prompts, len(prompts))
    assert tokens == run_in_waves(plain, prompts, len(prompts))
    assert counter.hits > 0
    assert_all_blocks_free(cached)
    if kv_cache_dtype == "auto":
        assert tokens == [hf_greedy(hf_model, p, GREEDY.max_tokens) for p in prompts]
