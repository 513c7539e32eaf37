"""Request and response bodies of the OpenAI API, as pydantic models.

Requests check types only; value ranges are checked once, by SamplingParams.validate in the
engine, so the two can never disagree. Optional sampling fields default to None, meaning "the
engine's default" (an explicit JSON null means the same). Unknown fields are ignored, as
OpenAI clients send fields that a server may not implement.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from wattserve.engine.request import InvalidRequestError, SamplingParams
from wattserve.engine.slo import SLO


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        content = self.content or ""
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        return {"role": role, "content": content}


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
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings that end generation; not included in the text.")
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
    # wattserve's own: the latency this request is counted against in the SLO metrics.
    slo: SLOSpec | None = Field(None, description="Latency SLO for this request, e.g. "
                                                  '{"ttft_ms": 200, "tpot_ms": 50}; overrides '
                                                  "--slo-ttft-ms/--slo-tpot-ms per field.")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = {
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

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, description="Output token limit (OpenAI's default: 16).")
    logprobs: int | None = Field(None, description="Return the chosen token's logprob and this "
                                                   "many alternatives, 0..20.")
    echo: bool = False
    suffix: str | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", "echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")
        return self.sampling_params(self.max_tokens, self.logprobs)

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError("only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        return prompt


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
    content: str


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
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
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
