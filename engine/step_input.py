"""What the model runner reads for one step: plain lists, no Sequence objects.

The scheduler builds it (engine/scheduler.py) from the sequences it scheduled; the runner
(engine/model_runner.py) turns it into device tensors. Sequence i computes tokens
[starts[i], starts[i] + num_new[i]) of its own, laid side by side in `token_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wattserve.engine.gpu_timer import GpuSpan
from wattserve.engine.prompt_logprobs import PromptScoring
from wattserve.engine.request import TokenLogprob


@dataclass
class StepInput:
    token_ids: list[int]  # flat, every sequence's new tokens; PLACEHOLDER where `ahead` fills in
    starts: list[int]  # per sequence: tokens already in the cache, the position of its first new one
    num_new: list[int]  # per sequence: tokens computed this step
    tables: list[list[int]]  # per sequence: its block table
    samples: list[bool]  # per sequence: its last new token is its last token, so it draws the next
    # Tokens still on the device, drawn by the step in flight (engine/core.py launches ahead):
    # (index in token_ids, row in that step's tokens).
    ahead: list[tuple[int, int]] = field(default_factory=list)
    # KIVI caches (int4, int2): per sequence, (its ring, the first position it wrote there);
    # see engine/kivi_plan.py. None for other caches.
    rings: list[tuple[int, int]] | None = None
    # n > 1 forks made this step, run after the forward pass (it writes the prompt they copy):
    # (source, destination) blocks, and for KIVI (source, destination) rings.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    ring_copies: list[tuple[int, int]] = field(default_factory=list)
    # Sequences asking for prompt logprobs: the rows to score (engine/prompt_logprobs.py).
    prompt_scorings: list[PromptScoring] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.starts)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [num sampling sequences, vocab], on the device
    gpu_span: GpuSpan | None  # the step's GPU time, where measured (engine/gpu_timer.py)
    prompt_logprobs: list[list[TokenLogprob]]  # one list per inputs.prompt_scorings, in order
