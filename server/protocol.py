"""Request and response bodies of the OpenAI API, as pydantic models.

Requests check types only; value ranges are checked once, by SamplingParams.validate in the
engine, so the two can never disagree. Optional sampling fields default to None, meaning "the
engine's default" (an explicit JSON null means the same). Unknown fields are kept aside
(`model_extra`) and otherwise ignored; server/unknown_fields.py logs them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from wattserve.engine.request import InvalidRequestError, SamplingParams
from wattserve.engine.slo import SLO
from wattserve.engine.structured.spec import OutputConstraint
from wattserve.server.protocol_tools import (
    ResponseFormat, StructuredOutputs, Tool, ToolCall, ToolCallDelta, ToolChoice,
    requested_constraint,
)

MAX_STOP_STRINGS = 4  # OpenAI's limit
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def as_template_input(self) -> dict:
        """The message as HF chat templates read it (tool calls' arguments as mappings)."""
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        content = self.content or ""
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        message = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [call.as_template_input() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def check(self, param: str) -> None:
        # OpenAI: only an assistant message that calls tools may leave `content` out.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidRequestError("a message needs 'content'", f"{param}.content")


class StreamOptions(_Request):
    include_usage: bool = False


class SLOSpec(_Request):
    ttft_ms: float | None = Field(None, gt=0, description="Time to first token bound, ms.")
    tpot_ms: float | None = Field(None, gt=0, description="Time per output token bound, ms.")

    def over(self, default: SLO | None) -> SLO | None:
        """This request's SLO: its own bounds, the server's (--slo-*-ms) where it gives none."""
        base = default or SLO()
        slo = SLO(ttft_s=base.ttft_s if self.ttft_ms is None else self.ttft_ms / 1e3,
                  tpot_s=base.tpot_s if self.tpot_ms is None else self.tpot_ms / 1e3)
        return None if slo == SLO() else slo


class SamplingRequest(_Request):
    """Fields that chat and completions share."""

    model: str | None = Field(None, description="A served model name; omitted: the first one.")
    max_tokens: int | None = Field(None, description="Output token limit; omitted: the rest "
                                                     "of the context.")
    temperature: float | None = Field(None, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1].")
    n: int | None = Field(None, description="Number of choices to generate.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings that end generation; not included in the text.",
        json_schema_extra={"maxItems": MAX_STOP_STRINGS})
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias added to "
                                                                  "its logit, -100..100.")
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extras beyond OpenAI, as vLLM accepts them.
    top_k: int | None = Field(None, description="Sample from the k most likely tokens; 0 or -1: "
                                                "off.")
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    # Output constraints: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # wattserve's own: the latency this request is counted against in the SLO metrics.
    slo: SLOSpec | None = Field(None, description="Latency SLO for this request, e.g. "
                                                  '{"ttft_ms": 200, "tpot_ms": 50}; overrides '
                                                  "--slo-ttft-ms/--slo-tpot-ms per field.")

    @field_validator("stop")
    @classmethod
    def _at_most_4_stop_strings(cls, stop):
        # Checked here rather than as the list's max_length: pydantic would report the union's
        # other member ("Input should be a valid string") instead of the limit.
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def output_constraint(self) -> OutputConstraint | None:
        guided = {"json": self.guided_json, "regex": self.guided_regex,
                  "choice": self.guided_choice, "grammar": self.guided_grammar}
        structured = self.structured_outputs
        if any(v is not None for v in guided.values()):
            if structured is not None:
                raise InvalidRequestError("give structured_outputs or guided_*, not both",
                                          "structured_outputs")
            structured = StructuredOutputs(**{k: v for k, v in guided.items() if v is not None})
        return requested_constraint(self.response_format, structured)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: OutputConstraint | None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream: true",
                                      "stream_options")
        given = {"structured": structured,
            "n": self.n, "max_tokens": max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "min_p": self.min_p, "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens, "stop_token_ids": self.stop_token_ids,
            "logprobs": logprobs, "logit_bias": _logit_bias(self.logit_bias),
            # vLLM clients send -1 for "off"; the engine's "off" is 0.
            "top_k": 0 if self.top_k == -1 else self.top_k,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", "logit_bias") from None


# What the server itself passes to a chat template.
_TEMPLATE_ARGUMENTS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = Field(None, description="none, auto, required or "
                                                             '{"type": "function", "function": '
                                                             '{"name": ...}}; default: auto with '
                                                             "tools, else none.")
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, description="Replaces max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="Alternatives per token, 0..20; "
                                                       "needs logprobs: true.")
    # vLLM's extra: variables for the chat template, e.g. Qwen3's {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Extra chat template variables, e.g. {"enable_thinking": false}.')

    def template_variables(self) -> dict[str, Any]:
        reserved = sorted(set(self.chat_template_kwargs or {}) & _TEMPLATE_ARGUMENTS)
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}",
                                      "chat_template_kwargs")
        return self.chat_template_kwargs or {}

    def to_sampling_params(self, tool_constraint: OutputConstraint | None) -> SamplingParams:
        """`tool_constraint`: the grammar that tool_choice required or a named function sets."""
        for i, message in enumerate(self.messages):
            message.check(f"messages.{i}")
        constraint = self.output_constraint()
        if constraint is not None and tool_constraint is not None:
            raise InvalidRequestError("response_format cannot be combined with a tool_choice "
                                      "that forces a call", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                    constraint or tool_constraint)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A prompt, or a list of them: each gets n choices, numbered in order.")
    max_tokens: int | None = Field(None, description="Output token limit; omitted or null: "
                                                     f"{DEFAULT_COMPLETION_MAX_TOKENS}, as OpenAI.")
    logprobs: int | None = Field(None, description="Return the chosen token's logprob and this "
                                                   "many alternatives, 0..20.")
    echo: bool = Field(False, description="Begin each choice with its prompt (and, with "
                                          "logprobs, the prompt tokens' logprobs).")
    suffix: str | None = None
    best_of: int | None = Field(None, description="Generate this many choices per prompt and "
                                                  "return the n with the highest mean token "
                                                  "logprob; not with stream.")

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def to_sampling_params(self) -> SamplingParams:
        """The engine's parameters for each prompt: best_of choices where asked, their
        logprobs on to rank them, and the prompt's logprobs for echo."""
        if self.suffix:
            raise InvalidRequestError("suffix is not supported: this model's template has no "
                                      "fill-in-the-middle form", "suffix")
        if self.best_of is not None:
            if self.best_of < self.choices_per_prompt:
                raise InvalidRequestError(f"best_of ({self.best_of}) must be at least n "
                                          f"({self.choices_per_prompt})", "best_of")
            if self.stream and self.best_of > self.choices_per_prompt:
                raise InvalidRequestError("best_of above n cannot be streamed", "best_of")
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
        ranked = self.best_of is not None and self.best_of > self.choices_per_prompt
        logprobs = self.logprobs if self.logprobs is not None or not ranked else 0
        params = self.sampling_params(max_tokens, logprobs, self.output_constraint())
        params.n = self.best_of or params.n
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params

    def prompts(self) -> list[str] | list[list[int]]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt
        return [prompt]


# ---- responses -------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobs] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_if_any(self, handler):
        # OpenAI leaves tool_calls out of a message that made none.
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class _Completion(BaseModel):
    id: str
    object: str  # each response narrows it; declared here to keep OpenAI's field order
    created: int
    model: str
    system_fingerprint: str


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_present(self, handler):
        # OpenAI's deltas carry only what changed: {"content": "x"}, never "role": null.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Completion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; its first token's entries are null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Completion):
    """Both the whole answer and, streamed, each chunk: OpenAI uses one shape for both."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "wattserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
