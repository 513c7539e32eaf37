"""POST /tokenize and /detokenize (vLLM's shapes) against the served tokenizer."""
import httpx

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def test_prompt_tokens_are_the_tokenizers(live_server, tokenizer):
    text = "The capital of France is"
    got = post(live_server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    ids = tokenizer.encode(text)
    assert got["tokens"] == ids and got["count"] == len(ids)
    assert got["token_strs"] == tokenizer.hf.convert_ids_to_tokens(ids)
    assert got["max_model_len"] == httpx.get(live_server.url + "/v1/models").json()[
        "data"][0]["max_model_len"]
    back = post(live_server, "/detokenize", {"tokens": ids}).json()
    assert back == {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}


def test_messages_count_what_chat_completions_bills(live_server, openai_client, served_model):
    got = post(live_server, "/tokenize", {"messages": FRANCE}).json()
    chat = openai_client.chat.completions.create(model=served_model, messages=FRANCE,
                                                 max_tokens=1)
    assert got["count"] == len(got["tokens"]) == chat.usage.prompt_tokens
    without = post(live_server, "/tokenize",
                   {"messages": FRANCE, "add_generation_prompt": False}).json()
    assert without["tokens"] == got["tokens"][:without["count"]] < got["tokens"]


def test_bad_bodies_are_400_naming_the_parameter(live_server):
    for path, body, param in (("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": FRANCE}, "prompt"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")):
        resp = post(live_server, path, body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    resp = post(live_server, "/tokenize", {"prompt": "a", "model": "gpt-9"})
    assert resp.status_code == 404
