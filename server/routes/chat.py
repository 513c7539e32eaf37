"""POST /v1/chat/completions."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Request

from wattserve.engine.request import SamplingParams
from wattserve.server.errors import documented
from wattserve.server.generation import Generation, until_disconnect
from wattserve.server.logprobs import chat_logprobs
from wattserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Delta,
)
from wattserve.server.routes.common import start
from wattserve.server.state import ServerState, State
from wattserve.server.streaming import SSE_RESPONSE, event, sse_response, stream_events

router = APIRouter()


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], **template_args) -> list[int]:
    # The template adds BOS itself where the model wants one.
    return tokenizer.encode(tokenizer.render_chat(messages, **template_args),
                            add_special_tokens=False)


async def start_chat(request: Request, state: ServerState, body: ChatCompletionRequest,
                     id_prefix: str) -> tuple[Generation, dict, SamplingParams]:
    """The chat request's generation, the header of its answer and its sampling parameters:
    what /v1/chat/completions and /v1/responses (translated to a chat request) share."""
    params = body.to_sampling_params()
    names = {"prompt": "messages", "logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    gen, header = await start(request, state, body.model, id_prefix, params, chat_prompt_ids,
                              [m.as_template_input() for m in body.messages], param_names=names,
                              slo=body.slo)
    return gen, header, params


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**documented(400, 401, 404, 408, 413, 429, 503), **SSE_RESPONSE})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: State):
    """A chat answer; with `stream: true`, Server-Sent Events of ChatCompletionChunk."""
    state.unknown_fields.note(request.url.path, body)
    gen, header, params = await start_chat(request, state, body, "chatcmpl")
    tokenizer = state.engine.tokenizer
    if body.stream:
        return sse_response(_events(gen, header, params.n, body.include_usage, tokenizer))
    async with aclosing(gen):
        results = await until_disconnect(request, gen.collect())
    return ChatCompletionResponse(**header, usage=gen.usage(), choices=[
        ChatChoice(index=r.index, message=AssistantMessage(content=r.text),
                   finish_reason=r.finish_reason,
                   logprobs=chat_logprobs(tokenizer, r.logprobs) if body.logprobs else None)
        for r in results])


def _events(gen: Generation, header: dict, n: int, include_usage: bool, tokenizer):
    def chunk(*choices: ChatChunkChoice, usage=None) -> str:
        return event(ChatCompletionChunk(**header, choices=list(choices), usage=usage),
                     include_usage)

    def chunks(out):
        for seq in out.outputs:
            if seq.text or seq.logprobs:
                logprobs = chat_logprobs(tokenizer, seq.logprobs) if seq.logprobs else None
                yield chunk(ChatChunkChoice(index=seq.index, delta=Delta(content=seq.text),
                                            logprobs=logprobs))
            if seq.finish_reason is not None:
                yield chunk(ChatChunkChoice(index=seq.index, delta=Delta(),
                                            finish_reason=seq.finish_reason.value))

    head = [chunk(ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")))
            for i in range(n)]
    return stream_events(gen, head, chunks,
                         (lambda: chunk(usage=gen.usage())) if include_usage else None)
