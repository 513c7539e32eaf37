"""Tokenizer on the default model's tokenizer (SmolLM2, rebuilt from its GGUF by
engine.loader.load_tokenizer_only in the session fixture `tokenizer`)."""
import pytest

from wattserve.engine.request import InvalidRequestError
from wattserve.engine.tokenizer import Tokenizer

IM_START, IM_END = 1, 2  # SmolLM2's <|im_start|> and <|im_end|>


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_token_ids == [IM_END]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_encode_decode_round_trip(tokenizer):
    text = "Hello world, ünïcode and   spaces\n"
    ids = tokenizer.encode(text)
    assert ids[:2] == [19556, 905], f"'Hello world' should be [19556, 905], got {ids[:2]}"
    assert tokenizer.decode(ids) == text


def test_special_tokens_in_text_encode_to_their_ids(tokenizer):
    # Rendered chat prompts carry <|im_start|> as text; it must become one token, not pieces.
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == IM_START and ids[-1] == IM_END, ids


def test_decode_skips_special_tokens_on_request(tokenizer):
    ids = [IM_START, 19556, 905, IM_END]
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>Hello world<|im_end|>"


@pytest.mark.parametrize("system", [None, "You are a pirate."])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers(tokenizer, system, add_generation_prompt):
    messages = [{"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Tell me a joke."}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    got = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    expected = tokenizer.hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert got == expected, \
        f"default template differs from transformers:\n{got!r}\n!=\n{expected!r}"


def test_render_chat_without_template_is_invalid_request(tokenizer):
    tok = Tokenizer(tokenizer.hf, None, [IM_END], None, None)
    with pytest.raises(InvalidRequestError, match="no chat template") as info:
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert info.value.param == "messages"
