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
    ({"echo": True}, "echo"),
    ({"suffix": "and"}, "suffix"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
])
def test_unsupported_or_invalid_is_400(live_server, extra, param):
    resp = httpx.post(live_server.url + "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 2, **extra})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param
