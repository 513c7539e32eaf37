"""A request's parameters, its sequences' state, and what the engine hands back."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wattserve.engine.structured.spec import OutputConstraint


class InvalidRequestError(ValueError):
    """A parameter is out of range; `param` names it for the API error."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequestError):
    pass


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineDead(RuntimeError):
    """The engine loop stopped (or the server is shutting down); no request can be served."""


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus top k
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's, plus top k
    structured: OutputConstraint | None = None  # the output's grammar (engine/structured)

    def validate(self, vocab_size: int) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidRequestError(msg, param)

        if self.n < 1 or self.n > 128:
            bad(f"n must be between 1 and 128, got {self.n}", "n")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:  # OpenAI's range
            bad(f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            bad(f"top_k must be 0 (off) or positive, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be between -2 and 2, got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= 100.0:
            bad(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}",
                "repetition_penalty")
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok < vocab_size:
                bad(f"logit_bias token id {tok} is outside the vocabulary", "logit_bias")
            if not -100.0 <= bias <= 100.0:
                bad(f"logit_bias values must be between -100 and 100, got {bias}", "logit_bias")
        if self.min_tokens < 0:
            bad(f"min_tokens must be at least 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= 20:
                bad(f"{name} must be between 0 and 20, got {k}", name)
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids must be ids in the vocabulary", "stop_token_ids")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed must fit in 64 bits", "seed")
        if self.structured is not None:
            # The grammar ends the output with EOS: past it, or with EOS banned, nothing is allowed.
            if self.ignore_eos:
                bad("ignore_eos cannot be combined with a structured output", "ignore_eos")
            if self.min_tokens:
                bad("min_tokens cannot be combined with a structured output", "min_tokens")
            self.structured.grammar()  # raises for an invalid schema, regex or grammar

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                  max_model_len: int) -> None:
    """Raise InvalidRequestError for anything the engine could not serve. The front end runs
    it before a request leaves for the engine process, the engine again when it arrives."""
    params.validate(vocab_size)
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequestError("the prompt has token ids outside the vocabulary", "prompt")
    if n >= max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {n} tokens; this model's context length is {max_model_len}", "prompt")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context length "
            f"{max_model_len}", "max_tokens")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop string or a stop token
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or the request timed out


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class SequenceOutput:
    """What one step added to one of a request's n sequences. The core sends token ids; the
    caller's OutputProcessor (engine/output_processor.py) detokenizes them into `text`."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    num_output_tokens: int  # cumulative
    text: str = ""  # new text since the previous output (stop strings removed)


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    outputs: list[SequenceOutput]
    finished: bool  # every sequence of the request has finished
    # With SamplingParams.prompt_logprobs, once: one per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: what a consumer that fell behind the engine
    takes at once, so it writes one response chunk instead of several."""
    merged: dict[int, SequenceOutput] = {}
    for out in outputs:
        for seq in out.outputs:
            into = merged.get(seq.index)
            if into is None:
                merged[seq.index] = replace(seq, token_ids=list(seq.token_ids),
                                            logprobs=None if seq.logprobs is None else list(seq.logprobs))
                continue
            into.token_ids += seq.token_ids
            into.text += seq.text
            if seq.logprobs is not None:
                into.logprobs = (into.logprobs or []) + seq.logprobs
            into.finish_reason, into.num_output_tokens = seq.finish_reason, seq.num_output_tokens
    last = outputs[-1]
    prompt_logprobs = next((out.prompt_logprobs for out in outputs if out.prompt_logprobs is not None), None)
    return RequestOutput(last.request_id, last.prompt_tokens, [merged[i] for i in sorted(merged)], last.finished,
                         prompt_logprobs)
