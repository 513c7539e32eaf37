"""Prompt logprobs (`SamplingParams.prompt_logprobs`): how likely the model found each prompt
token given the ones before it, as /v1/completions' `echo` with `logprobs` reports them.

The scheduler asks for them (`scoring`) when it schedules a chunk of such a sequence's prompt:
the hidden state at position p scores the prompt token at p + 1. A prompt prefilled in chunks
is scored chunk by chunk, in order; a preempted sequence recomputing its prompt scores nothing
twice. The model runner scores the rows after the forward pass (`score`), and the scheduler
appends the results to the sequence when it reads the step back. Such a sequence is admitted
without the prefix cache, since cached blocks are never computed and so never scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wattserve.engine.request import TokenLogprob
from wattserve.engine.sequence import Sequence


@dataclass
class PromptScoring:
    """One sequence's rows to score in a step."""
    seq_index: int  # in the step's batch
    first_row: int  # in the step's flat hidden states
    targets: list[int]  # the prompt tokens the rows from first_row on predict, one per row
    top_k: int


def wanted(seq: Sequence) -> bool:
    return seq.params.prompt_logprobs is not None


def scoring(seq: Sequence, seq_index: int, first_row: int, start: int, n: int) -> PromptScoring | None:
    """What to score of a sequence computing positions [start, start + n) from hidden row
    `first_row` on; advances `seq.num_prompt_scored` (the scheduler owns it)."""
    begin = max(start, seq.num_prompt_scored)
    end = min(start + n, seq.prompt_len - 1)  # the last prompt position predicts no prompt token
    if begin >= end:
        return None
    seq.num_prompt_scored = end
    return PromptScoring(seq_index, first_row + begin - start, seq.token_ids[begin + 1 : end + 1],
                         seq.params.prompt_logprobs)


def score(compute_logits, hidden: torch.Tensor, scorings: list[PromptScoring]) -> list[list[TokenLogprob]]:
    """hidden: the step's [num_scheduled_tokens, hidden_size]. One list per scoring, in order."""
    scored = []
    for s in scorings:
        logprobs = compute_logits(hidden[s.first_row : s.first_row + len(s.targets)]).float().log_softmax(-1)
        targets = torch.tensor(s.targets, device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
        top_vals, top_ids = logprobs.topk(s.top_k) if s.top_k else (logprobs[:, :0], logprobs[:, :0].long())
        scored.append([TokenLogprob(token, logprob, list(zip(ids, vals)))
                       for token, logprob, ids, vals in zip(s.targets, chosen, top_ids.tolist(), top_vals.tolist())])
    return scored
