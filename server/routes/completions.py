"""POST /v1/completions (the legacy text completion API)."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Request

from wattserve.server.errors import documented
from wattserve.server.generation import Generation, until_disconnect
from wattserve.server.logprobs import completion_logprobs
from wattserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from wattserve.server.routes.common import start
from wattserve.server.state import State
from wattserve.server.streaming import event, sse_response, stream_events

router = APIRouter()


def _prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return prompt


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=documented(400, 401, 404, 408, 413, 429, 503))
async def create_completion(body: CompletionRequest, request: Request,
                            state: State):
    """A text completion; with `stream: true`, Server-Sent Events of CompletionResponse."""
    params = body.to_sampling_params()
    gen, header = await start(request, state, body.model, "cmpl", params, _prompt_ids,
                              body.single_prompt(), slo=body.slo, param_names={
                                  "structured_output": "response_format" if body.response_format
                                  else "structured_outputs"})
    tokenizer = state.engine.tokenizer
    if body.stream:
        return sse_response(_events(gen, header, body.include_usage, tokenizer))
    async with aclosing(gen):
        results = await until_disconnect(request, gen.collect())
    return CompletionResponse(**header, usage=gen.usage(), choices=[
        CompletionChoice(index=r.index, text=r.text, finish_reason=r.finish_reason,
                         logprobs=completion_logprobs(tokenizer, r.logprobs, 0)
                         if body.logprobs is not None else None)
        for r in results])


def _events(gen: Generation, header: dict, include_usage: bool, tokenizer):
    emitted: dict[int, int] = {}  # characters of text sent so far, per choice (text_offset)

    def chunk(*choices: CompletionChoice, usage=None) -> str:
        return event(CompletionResponse(**header, choices=list(choices), usage=usage),
                     include_usage)

    def chunks(out):
        for seq in out.outputs:
            if seq.text or seq.logprobs:
                offset = emitted.get(seq.index, 0)
                logprobs = (completion_logprobs(tokenizer, seq.logprobs, offset)
                            if seq.logprobs else None)
                emitted[seq.index] = offset + len(seq.text)
                yield chunk(CompletionChoice(index=seq.index, text=seq.text, logprobs=logprobs))
            if seq.finish_reason is not None:
                yield chunk(CompletionChoice(index=seq.index, text="",
                                             finish_reason=seq.finish_reason.value))

    return stream_events(gen, [], chunks,
                         (lambda: chunk(usage=gen.usage())) if include_usage else None)
