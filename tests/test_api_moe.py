"""A mixture-of-experts model served: /v1/completions greedy tokens equal HF generate's."""
import pytest
import torch
from hf_oracle import PROMPTS
from test_moe_models import build_tiny_moe


@pytest.fixture(scope="module")
def qwen3_moe(start_server, tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("qwen3-moe")
    hf_model = build_tiny_moe("qwen3_moe", directory, tokenizer)
    return start_server(str(directory)), hf_model


def test_greedy_completions_equal_hf_generate(qwen3_moe, tokenizer):
    from openai import OpenAI

    server, hf_model = qwen3_moe
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        # Token-id prompts, so both sides see the same ids; ignore_eos as min_new_tokens.
        resp = client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=32,
                                         extra_body={"ignore_eos": True})
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False)[0, len(ids):].tolist()
        assert resp.usage.completion_tokens == 32
        # 32 random-weight tokens: a single differing token shows in the text.
        assert resp.choices[0].text == tokenizer.hf.decode(want)
