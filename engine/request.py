"""A request's parameters, its sequences' state, and what the engine hands back."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
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
    structured: OutputConstraint | None = None  # the output's grammar (engine/structured)

    def validate(self, vocab_size: int) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidRequestError(msg, param)

        if self.n < 1 or self.n > 128:
            bad(f"n must be between 1 and 128, got {self.n}", "n")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be between 0 and 100, got {self.temperature}", "temperature")
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
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be between 0 and 20, got {self.logprobs}", "logprobs")
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


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


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
    """What one step added to one of a request's n sequences."""

    index: int
    text: str  # new text since the previous output (stop strings removed)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    num_output_tokens: int  # cumulative


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    outputs: list[SequenceOutput]
    finished: bool  # every sequence of the request has finished
