import pytest

from wattserve.engine.detokenizer import IncrementalDetokenizer


def stream(tokenizer, text, stop=(), prompt="Say:"):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.hf, prompt_ids, list(stop))
    chunks = []
    for t in ids:
        detok.add(t)
        chunks.append(detok.take(final=False))
        if detok.stopped_by:
            break
    chunks.append(detok.take(final=True))
    return ids, chunks, detok


@pytest.mark.parametrize("text", [
    "Héllo wörld, naïve café", "日本語のテキストです", "emoji 🌍🚀 and 👩‍👩‍👧 family", "tabs\tand\nnewlines  x",
])
def test_streamed_text_equals_full_decode_and_never_splits_a_character(tokenizer, text):
    ids, chunks, _ = stream(tokenizer, text)
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    # Multi-byte characters span several tokens here, so some steps must have emitted nothing.
    if any(ord(ch) > 0x2000 for ch in text):
        assert len(ids) > len(text.encode("utf-8")) / 4 and "" in chunks[:-1]


def test_stop_string_across_token_boundaries_is_cut_and_never_emitted(tokenizer):
    text = "The capital of France is Paris. It is big."
    stop = "is Paris"
    ids, chunks, detok = stream(tokenizer, text, stop=[stop])
    pieces = [tokenizer.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces), "the stop string must span tokens for this test"
    assert detok.stopped_by == stop
    assert "".join(chunks) == "The capital of France "
    assert all("is" not in c for c in chunks), "a possible stop prefix was emitted early"


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    ids, chunks, detok = stream(tokenizer, "This is fine", stop=["is Paris"])
    assert detok.stopped_by is None
    assert "".join(chunks) == "This is fine"
