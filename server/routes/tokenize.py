"""POST /tokenize and /detokenize, in vLLM's shapes: what a client needs to count tokens or
build token-id prompts with the server's own tokenizer and chat template."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from wattserve.engine.request import InvalidRequestError
from wattserve.server.errors import documented
from wattserve.server.protocol import ChatMessage, _Request
from wattserve.server.routes.chat import chat_prompt_ids
from wattserve.server.state import State

router = APIRouter()


class TokenizeRequest(_Request):
    """Either `prompt` (text, as /v1/completions tokenizes it) or `messages` (rendered by the
    chat template, as /v1/chat/completions does)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="For `prompt`: add BOS where the "
                                                       "tokenizer does.")
    add_generation_prompt: bool = Field(True, description="For `messages`: end with the "
                                                          "assistant's turn opening.")
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _tokenize(tokenizer, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send either 'prompt' or 'messages'", "prompt")
    if body.prompt is not None:
        return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    for i, message in enumerate(body.messages):
        message.check(f"messages.{i}")
    return chat_prompt_ids(tokenizer, [m.as_template_input() for m in body.messages],
                           add_generation_prompt=body.add_generation_prompt)


@router.post("/tokenize", response_model=TokenizeResponse, responses=documented(400, 404))
async def tokenize(body: TokenizeRequest, request: Request, state: State):
    state.unknown_fields.note(request.url.path, body)
    state.model_name(body.model)
    tokenizer = state.engine.tokenizer
    ids = await state.tokenize(_tokenize, tokenizer, body)
    strs = tokenizer.hf.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.info.max_model_len,
                            tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=documented(400, 404))
async def detokenize(body: DetokenizeRequest, request: Request, state: State):
    state.unknown_fields.note(request.url.path, body)
    state.model_name(body.model)
    tokenizer = state.engine.tokenizer
    if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
        raise InvalidRequestError("tokens has ids outside the vocabulary", "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
