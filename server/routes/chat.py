"""POST /v1/chat/completions."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Request

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
from wattserve.server.state import State
from wattserve.server.streaming import event, sse_response, stream_events

router = APIRouter()


def _prompt_ids(tokenizer, messages: list[dict[str, str]], variables: dict) -> list[int]:
    # The template adds BOS itself where the model wants one.
    return tokenizer.encode(tokenizer.render_chat(messages, **variables), add_special_tokens=False)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=documented(400, 401, 404, 408, 413, 429, 503))
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: State):
    """A chat answer; with `stream: true`, Server-Sent Events of ChatCompletionChunk."""
    params = body.to_sampling_params()
    variables = body.template_variables()
    names = {"prompt": "messages", "logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    gen, header = await start(request, state, body.model, "chatcmpl", params, _prompt_ids,
                              [m.as_template_input() for m in body.messages], variables,
                              param_names=names,
                              slo=body.slo)
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
