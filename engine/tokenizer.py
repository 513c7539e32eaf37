"""The checkpoint's tokenizer plus what serving needs beside it: EOS ids and the chat template."""
from __future__ import annotations

from typing import Any

from wattserve.engine.chat_template import ChatTemplate
from wattserve.engine.request import InvalidRequestError


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, chat_template: str | None, eos_token_ids: list[int],
                 bos_token: str | None, eos_token: str | None):
        self.hf = hf_tokenizer  # a transformers tokenizer; the detokenizer reads it directly
        self.vocab_size: int = len(hf_tokenizer)
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = ChatTemplate(chat_template) if chat_template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raises InvalidRequestError(param="prompt") for text that is not valid Unicode:
        JSON can carry lone surrogates ("\\ud800"), which no tokenizer accepts."""
        try:
            text.encode()
        except UnicodeEncodeError:
            raise InvalidRequestError("the prompt contains a lone surrogate: not valid Unicode",
                                      param="prompt") from None
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The prompt text for `messages`; raises InvalidRequestError(param="messages")."""
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template; send a plain prompt to /v1/completions",
                param="messages",
            )
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt,
            **{"bos_token": self.bos_token, "eos_token": self.eos_token, **template_kwargs},
        )
