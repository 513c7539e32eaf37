"""POST /v1/completions (legacy text completions) through the real openai SDK."""
import httpx
import pytest

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def paris(openai_client, served_model):
    return openai_client.completions.create(
        model=served_model, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2)


def test_greedy_completion_with_exact_usage(paris, served_model, tokenizer):
    choice = paris.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert paris.object == "text_completion" and paris.model == served_model
    assert paris.id.startswith("cmpl-") and paris.system_fingerprint.startswith("fp_")
    assert paris.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert paris.usage.completion_tokens == 6
    assert paris.usage.total_tokens == paris.usage.prompt_tokens + 6


def test_logprobs_shape(paris):
    lp = paris.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == paris.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and top[token] == logprob == max(top.values())


def test_token_id_prompt_equals_text_prompt(openai_client, served_model, paris, tokenizer):
    ids = tokenizer.encode(PROMPT)
    for prompt in (ids, [ids]):
        resp = openai_client.completions.create(
            model=served_model, prompt=prompt, temperature=0, max_tokens=6)
        assert resp.choices[0].text == paris.choices[0].text


def test_default_max_tokens_is_16(openai_client, served_model):
    resp = openai_client.completions.create(
        model=served_model, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16


def test_streamed_text_equals_non_streamed(openai_client, served_model, paris):
    chunks = list(openai_client.completions.create(
        model=served_model, prompt=PROMPT, temperature=0, max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == paris.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("extra, param", [
    ({"suffix": "and"}, "suffix"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": ["fine", [10**9]]}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"echo": True, "logprobs": 21}, "logprobs"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"best_of": 500}, "best_of"),
])
def test_unsupported_or_invalid_is_400(live_server, extra, param):
    resp = httpx.post(live_server.url + "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 2, **extra})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param
    assert live_server.wait_idle()["wattserve:kv_cache_blocks_used"] == 0


def test_several_prompts_equal_one_by_one(openai_client, served_model, tokenizer):
    prompts = [PROMPT, "Once upon a time"]
    sampled = {"model": served_model, "temperature": 1.0, "seed": 7, "n": 2, "max_tokens": 4,
               "logprobs": 1}
    together = openai_client.completions.create(prompt=prompts, **sampled)
    alone = [openai_client.completions.create(prompt=p, **sampled) for p in prompts]
    assert [c.index for c in together.choices] == list(range(4))
    assert [(c.text, c.logprobs.tokens) for c in together.choices] == [
        (c.text, c.logprobs.tokens) for r in alone for c in r.choices]
    assert together.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone)
    as_ids = openai_client.completions.create(
        prompt=[tokenizer.encode(p) for p in prompts], **sampled)
    assert [c.text for c in as_ids.choices] == [c.text for c in together.choices]
    streamed = openai_client.completions.create(prompt=prompts, stream=True, **sampled)
    texts = [""] * 4
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in together.choices]


def test_echo_with_logprobs_gives_transformers_prompt_logprobs(openai_client, served_model,
                                                               tokenizer):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from wattserve.engine.loader import default_model_path

    resp = openai_client.completions.create(model=served_model, prompt=PROMPT, echo=True,
                                            logprobs=1, max_tokens=3, temperature=0)
    choice, ids = resp.choices[0], tokenizer.encode(PROMPT)
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and "Paris" in choice.text[len(PROMPT):]
    assert len(lp.tokens) == len(ids) + 3 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                              gguf_file=os.path.basename(path)).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    # fp32 on both sides; logits agree to ~1e-4 of the largest (tests/test_engine_model.py),
    # a logprob moves by at most twice a logit's error: 5e-3 is a few times that, far below
    # the gaps between candidate answers that lm-eval's loglikelihood compares.
    got = torch.tensor(lp.token_logprobs[1:len(ids)])
    assert (got - want).abs().max() < 5e-3
    plain = openai_client.completions.create(model=served_model, prompt=PROMPT, echo=True,
                                             max_tokens=3, temperature=0)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    streamed = openai_client.completions.create(model=served_model, prompt=PROMPT, echo=True,
                                                max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_best_of_returns_the_n_most_likely(openai_client, served_model):
    # Seeded: choice i draws from seed + i, so best_of's candidates are the pool's choices.
    sampled = {"model": served_model, "prompt": PROMPT, "temperature": 1.0, "seed": 3,
               "max_tokens": 4, "extra_body": {"ignore_eos": True}}
    pool = openai_client.completions.create(n=4, logprobs=0, **sampled)
    best = openai_client.completions.create(n=2, best_of=4, **sampled)
    ranked = sorted(pool.choices, key=lambda c: -sum(c.logprobs.token_logprobs))[:2]
    assert [c.text for c in best.choices] == [
        c.text for c in sorted(ranked, key=lambda c: c.index)]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 16
