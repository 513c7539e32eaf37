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
from wattserve.server.tool_calls import ToolCallReader, ToolPlan, assemble, plan_tools

router = APIRouter()


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    variables: dict | None = None, **render_args) -> list[int]:
    """`variables`: the request's chat_template_kwargs."""
    # The template adds BOS itself where the model wants one.
    return tokenizer.encode(tokenizer.render_chat(messages, tools=tools, **(variables or {}),
                                                  **render_args), add_special_tokens=False)


async def start_chat(request: Request, state: ServerState, body: ChatCompletionRequest,
                     id_prefix: str) -> tuple[Generation, dict, SamplingParams, ToolPlan]:
    """The chat request's generation, the header of its answer, its sampling parameters and
    its tool plan: what /v1/chat/completions and /v1/responses (translated to a chat request)
    share."""
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, state.tool_parser)
    params = body.to_sampling_params(plan.constraint)
    variables = body.template_variables()
    names = {"prompt": "messages", "logprobs": "top_logprobs",
             "structured_output": "tools" if plan.constraint else "response_format"}
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    gen, header = await start(request, state, body.model, id_prefix, params, chat_prompt_ids,
                              [m.as_template_input() for m in body.messages], tools,
                              variables, param_names=names, slo=body.slo)
    return gen, header, params, plan


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**documented(400, 401, 404, 408, 413, 429, 503), **SSE_RESPONSE})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: State):
    """A chat answer; with `stream: true`, Server-Sent Events of ChatCompletionChunk."""
    state.unknown_fields.note(request.url.path, body)
    gen, header, params, plan = await start_chat(request, state, body, "chatcmpl")
    tokenizer = state.engine.tokenizer
    if body.stream:
        return sse_response(_events(gen, header, params.n, body.include_usage, tokenizer, plan))
    async with aclosing(gen):
        results = await until_disconnect(request, gen.collect())
    choices = []
    for r in results:
        content, calls, finish_reason = r.text, None, r.finish_reason
        if plan.mode is not None:
            reader = ToolCallReader(plan)
            content, calls = assemble(reader.feed(r.text) + reader.finish())
            finish_reason = _finish_reason(finish_reason, reader)
        choices.append(ChatChoice(
            index=r.index, message=AssistantMessage(content=content, tool_calls=calls),
            finish_reason=finish_reason,
            logprobs=chat_logprobs(tokenizer, r.logprobs) if body.logprobs else None))
    return ChatCompletionResponse(**header, usage=gen.usage(), choices=choices)


def _finish_reason(reason: str | None, reader: ToolCallReader) -> str | None:
    # A call cut short by max_tokens stays "length": its arguments are not whole.
    return "tool_calls" if reason == "stop" and reader.num_calls else reason


def _events(gen: Generation, header: dict, n: int, include_usage: bool, tokenizer,
            plan: ToolPlan):
    readers = {i: ToolCallReader(plan) for i in range(n)} if plan.mode is not None else {}

    def chunk(*choices: ChatChunkChoice, usage=None) -> str:
        return event(ChatCompletionChunk(**header, choices=list(choices), usage=usage),
                     include_usage)

    def deltas(index: int, text: str, final: bool) -> list[Delta]:
        if not readers:
            return [Delta(content=text)] if text else []
        reader = readers[index]
        pieces = reader.feed(text) + (reader.finish() if final else [])
        return [Delta(content=p.content) if p.call is None else Delta(tool_calls=[p.call])
                for p in pieces]

    def chunks(out):
        for seq in out.outputs:
            final = seq.finish_reason is not None
            logprobs = chat_logprobs(tokenizer, seq.logprobs) if seq.logprobs else None
            pieces = deltas(seq.index, seq.text, final)
            if logprobs and not pieces:
                pieces = [Delta()]  # the tokens' logprobs, though their text is held back
            for delta in pieces:
                yield chunk(ChatChunkChoice(index=seq.index, delta=delta, logprobs=logprobs))
                logprobs = None
            if final:
                reason = seq.finish_reason.value
                if readers:
                    reason = _finish_reason(reason, readers[seq.index])
                yield chunk(ChatChunkChoice(index=seq.index, delta=Delta(), finish_reason=reason))

    head = [chunk(ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")))
            for i in range(n)]
    return stream_events(gen, head, chunks,
                         (lambda: chunk(usage=gen.usage())) if include_usage else None)
