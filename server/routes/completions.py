"""POST /v1/completions (the legacy text completion API): one or several prompts, n choices
each (the best n of best_of), optionally echoing the prompt and its logprobs."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Request

from wattserve.server.errors import documented
from wattserve.server.generation import Generation, SequenceResult, until_disconnect
from wattserve.server.generation_group import GenerationGroup
from wattserve.server.logprobs import completion_logprobs, joined, prompt_logprobs
from wattserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from wattserve.server.routes.common import start
from wattserve.server.state import State
from wattserve.server.streaming import SSE_RESPONSE, event, sse_response, stream_events

router = APIRouter()


def _prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return prompt


class _Echo:
    """What a choice of one prompt starts with when echo is on: the prompt's text, and with
    logprobs the prompt tokens' (those of the generated text are counted from its end)."""

    def __init__(self, body: CompletionRequest, tokenizer, prompt: str | list[int],
                 gen: Generation):
        self.text, self.logprobs = "", None
        if body.echo:
            self.text = prompt if isinstance(prompt, str) else tokenizer.decode(
                prompt, skip_special_tokens=False)
            if body.logprobs is not None:
                self.logprobs = prompt_logprobs(tokenizer, gen.prompt_ids, gen.prompt_logprobs)

    def choice(self, index: int, text: str, logprobs, tokenizer, finish_reason=None
               ) -> CompletionChoice:
        """`logprobs`: the generated tokens' (TokenLogprob), or None when not asked."""
        if logprobs is not None:
            logprobs = completion_logprobs(tokenizer, logprobs, len(self.text))
            if self.logprobs is not None:
                logprobs = joined(self.logprobs, logprobs)
        return CompletionChoice(index=index, text=self.text + text, logprobs=logprobs,
                                finish_reason=finish_reason)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**documented(400, 401, 404, 408, 413, 429, 503), **SSE_RESPONSE})
async def create_completion(body: CompletionRequest, request: Request,
                            state: State):
    """A text completion; with `stream: true`, Server-Sent Events of CompletionResponse."""
    state.unknown_fields.note(request.url.path, body)
    params = body.to_sampling_params()
    prompts = body.prompts()
    names = {"prompt_logprobs": "logprobs",
             "structured_output": "response_format" if body.response_format else "structured_outputs"}
    if body.best_of is not None:
        names["n"] = "best_of"
    group, header = await GenerationGroup.start([
        start(request, state, body.model, "cmpl", params, _prompt_ids, prompt,
              param_names=names, slo=body.slo, part=i if len(prompts) > 1 else None)
        for i, prompt in enumerate(prompts)], body.choices_per_prompt)
    tokenizer = state.engine.tokenizer
    echoes = [_Echo(body, tokenizer, prompt, gen) for prompt, gen in zip(prompts, group.gens)]
    if body.stream:
        return sse_response(_events(group, header, body, echoes, tokenizer))
    async with aclosing(group):
        per_prompt = await until_disconnect(request, group.collect())
    choices = []
    for echo, results in zip(echoes, per_prompt):
        for result in _best(results, body.choices_per_prompt):
            choices.append(echo.choice(
                len(choices), result.text,
                result.logprobs if body.logprobs is not None else None, tokenizer,
                result.finish_reason))
    return CompletionResponse(**header, usage=group.usage(), choices=choices)


def _best(results: list[SequenceResult], n: int) -> list[SequenceResult]:
    """best_of: the n choices with the highest mean token logprob (OpenAI's "highest log
    probability per token"), in the order they were generated."""
    if len(results) == n:
        return results

    def mean(r: SequenceResult) -> float:
        return sum(lp.logprob for lp in r.logprobs) / max(1, len(r.logprobs))
    best = sorted(results, key=mean, reverse=True)[:n]
    return sorted(best, key=lambda r: r.index)


def _events(group: GenerationGroup, header: dict, body: CompletionRequest, echoes: list[_Echo],
            tokenizer):
    n = body.choices_per_prompt
    emitted: dict[int, int] = {}  # characters of text sent so far, per choice (text_offset)
    include_usage = body.include_usage

    def chunk(*choices: CompletionChoice, usage=None) -> str:
        return event(CompletionResponse(**header, choices=list(choices), usage=usage),
                     include_usage)

    def chunks(out):
        for seq in out.outputs:
            echo = echoes[seq.index // n]
            if seq.index not in emitted:  # the choice's first chunk carries the echo
                emitted[seq.index] = 0
                if echo.text:
                    yield chunk(echo.choice(seq.index, "", [] if body.logprobs is not None
                                            else None, tokenizer))
                    emitted[seq.index] = len(echo.text)
            if seq.text or seq.logprobs:
                offset = emitted[seq.index]
                logprobs = (completion_logprobs(tokenizer, seq.logprobs, offset)
                            if seq.logprobs else None)
                emitted[seq.index] = offset + len(seq.text)
                yield chunk(CompletionChoice(index=seq.index, text=seq.text, logprobs=logprobs))
            if seq.finish_reason is not None:
                yield chunk(CompletionChoice(index=seq.index, text="",
                                             finish_reason=seq.finish_reason.value))

    return stream_events(group, [], chunks,
                         (lambda: chunk(usage=group.usage())) if include_usage else None)
