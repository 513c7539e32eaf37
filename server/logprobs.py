"""The engine's per-token logprobs in the two shapes OpenAI uses (chat and legacy completions).

A token is shown as the text it decodes to, as OpenAI and vLLM do, not as the tokenizer's
internal piece ("ĠParis"); `bytes` are that text's UTF-8 bytes. Special tokens keep their
text ("<|im_end|>"): an alternative that decodes to "" would tell the client nothing.
"""
from __future__ import annotations

from itertools import accumulate

from wattserve.engine.request import TokenLogprob
from wattserve.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobs, TopLogprob


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = _text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in logprobs:
        chosen = entry(lp.token_id, lp.logprob)
        top = [entry(tid, value) for tid, value in lp.top]
        content.append(TokenLogprobs(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int
                        ) -> CompletionLogprobs:
    """`offset`: characters of generated text before these tokens (for text_offset)."""
    tokens, offsets = [], []
    for lp in logprobs:
        text = _text(tokenizer, lp.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{_text(tokenizer, tid): value for tid, value in lp.top}
                      for lp in logprobs],
        text_offset=offsets,
    )


def prompt_logprobs(tokenizer, prompt_ids: list[int], logprobs: list[TokenLogprob | None]
                    ) -> CompletionLogprobs:
    """The prompt's part of an echo: its tokens, their logprobs (the first null: nothing
    precedes it), offsets from the start of the text."""
    tokens = [_text(tokenizer, token_id) for token_id in prompt_ids]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if lp is None else lp.logprob for lp in logprobs],
        top_logprobs=[None if lp is None else {_text(tokenizer, tid): v for tid, v in lp.top}
                      for lp in logprobs],
        text_offset=list(accumulate(map(len, tokens), initial=0))[:-1],
    )


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(**{name: getattr(first, name) + getattr(then, name)
                                 for name in CompletionLogprobs.model_fields})


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)
