"""POST /v1/chat/completions, non-streamed, through the real openai SDK (sync and async)."""
import pytest
from openai import AsyncOpenAI

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False))


@pytest.fixture(scope="module")
def paris(openai_client, served_model):
    """The greedy answer to FRANCE, which other tests compare against."""
    return openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=16)


def test_greedy_answer_names_paris_with_exact_usage(paris, served_model, tokenizer):
    choice = paris.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert paris.object == "chat.completion" and paris.model == served_model
    assert paris.id.startswith("chatcmpl-") and paris.system_fingerprint.startswith("fp_")
    assert paris.usage.prompt_tokens == prompt_tokens(tokenizer, FRANCE)
    completion_ids = tokenizer.encode(choice.message.content, add_special_tokens=False)
    # The answer's tokens, plus the end-of-turn token that stopped it.
    assert paris.usage.completion_tokens == len(completion_ids) + 1
    assert paris.usage.total_tokens == paris.usage.prompt_tokens + paris.usage.completion_tokens


def test_request_id_header_matches_completion_id(openai_client, served_model):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=1)
    assert raw.parse().id == "chatcmpl-" + raw.headers["x-request-id"]


def test_content_parts_and_roles(openai_client, served_model, paris, tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of "},
                                          {"type": "text", "text": "France?"}]}]
    joined = [{"role": "user", "content": "What is the capital of \nFrance?"}]
    resp = openai_client.chat.completions.create(
        model=served_model, messages=parts, temperature=0, max_tokens=4)
    assert resp.usage.prompt_tokens == prompt_tokens(tokenizer, joined)
    talk = [{"role": "system", "content": "You answer in one word."}, *FRANCE,
            {"role": "assistant", "content": paris.choices[0].message.content},
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "And Italy?"}]
    resp = openai_client.chat.completions.create(
        model=served_model, messages=talk, temperature=0, max_tokens=4)
    as_system = [{**m, "role": "system"} if m["role"] == "developer" else m for m in talk]
    assert resp.usage.prompt_tokens == prompt_tokens(tokenizer, as_system)


def test_length_limits(openai_client, served_model):
    resp = openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=20,
        max_completion_tokens=3)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
    resp = openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=24,
        extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 24


def test_stop_string_ends_the_answer_before_it(openai_client, served_model, paris):
    text = paris.choices[0].message.content
    resp = openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=16, stop=["Paris", "x"])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == text[:text.index("Paris")]


def test_logprobs_shape(openai_client, served_model):
    resp = openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=5, logprobs=True,
        top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        assert t.logprob <= 0 and t.top_logprobs[0].token == t.token  # greedy: the best
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
    plain = openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_unknown_fields_are_ignored(openai_client, served_model):
    resp = openai_client.chat.completions.create(
        model=served_model, messages=FRANCE, temperature=0, max_tokens=2, user="u1",
        extra_body={"no_such_field": {"a": [1]}, "top_k": -1, "min_p": 0.0,
                    "repetition_penalty": 1.0, "presence_penalty": 0.5,
                    "frequency_penalty": 0.5, "logit_bias": {"0": -100}})
    assert resp.usage.completion_tokens == 2


async def test_async_client_seeded_n3_is_reproducible(live_server, served_model):
    client = AsyncOpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
    async with client:
        runs = [await client.chat.completions.create(
            model=served_model, messages=FRANCE, n=3, seed=1234, temperature=1.0,
            max_tokens=8) for _ in range(2)]
    texts = [[c.message.content for c in run.choices] for run in runs]
    assert [c.index for c in runs[0].choices] == [0, 1, 2]
    assert texts[0] == texts[1]
    assert len(set(texts[0])) > 1, "three samples should not all be the same"
    assert runs[0].usage.completion_tokens == runs[1].usage.completion_tokens <= 24
