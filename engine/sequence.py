"""One generated sequence: its tokens, how many are in the KV cache, and its decoding state.

The scheduler (engine/scheduler.py) is the one writer of its progress: `num_computed_tokens`,
its tokens past the prompt and `finish_reason`."""
from __future__ import annotations

import itertools

import torch

from wattserve.engine.request import FinishReason, SamplingParams, TokenLogprob

_ids = itertools.count()

# A token drawn on the device by a step whose result the host has not read yet (engine/core.py
# launches the next step first): it stands in `token_ids` until then.
PLACEHOLDER = -1


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n choices
        self.prompt_len = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.ahead_row: int | None = None  # the row of its last PLACEHOLDER in that step's tokens
        self.finish_reason: FinishReason | None = None
        # Per-sequence generator: the same seed gives the same tokens whatever else is batched.
        self.generator: torch.Generator | None = None
        self.grammar = None  # params.structured's xgrammar matcher, once compiled (engine/structured)
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + index) % 2**64)
        # Output accumulated since the last RequestOutput was emitted.
        self.pending_token_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        # With params.prompt_logprobs (engine/prompt_logprobs.py): the prompt positions scheduled
        # for scoring so far, and the scores read back.
        self.num_prompt_scored = 0
        self.prompt_logprobs: list[TokenLogprob] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def __repr__(self) -> str:
        return f"Sequence({self.request_id}#{self.index}, {self.num_computed_tokens}/{self.num_tokens})"
