"""Prompt logprobs (`SamplingParams.prompt_logprobs`): how likely the model found each prompt
token given the ones before it, as /v1/completions' `echo` with `logprobs` reports them.

The model runner calls `record` after each forward pass: for a sequence asking for them, the
hidden states of the prefill rows it just computed give the logits of the prompt tokens that
follow. A prompt prefilled in chunks is scored chunk by chunk, in order; a preempted sequence
recomputing its prompt scores nothing twice. The scheduler admits such a sequence without the
prefix cache, since cached blocks are never computed and so never scored.
"""
from __future__ import annotations

import torch

from wattserve.engine.request import TokenLogprob
from wattserve.engine.sequence import Sequence


def wanted(seq: Sequence) -> bool:
    return seq.params.prompt_logprobs is not None


def record(compute_logits, hidden: torch.Tensor, seqs: list[Sequence], num_new: list[int]) -> None:
    """hidden: [num_scheduled_tokens, hidden_size], the rows of `seqs` in order, each
    sequence's `num_new` tokens from its `num_computed_tokens` on (not yet advanced)."""
    start_row = 0
    for seq, n in zip(seqs, num_new):
        if wanted(seq):
            _record_one(compute_logits, hidden[start_row : start_row + n], seq)
        start_row += n


def _record_one(compute_logits, hidden: torch.Tensor, seq: Sequence) -> None:
    # Row i sits at position start + i and scores the token at position start + i + 1.
    start = seq.num_computed_tokens
    first = len(seq.prompt_logprobs) + 1  # the first prompt position not yet scored
    last = seq.prompt_len - 1  # the last prompt position
    begin, end = max(first, start + 1), min(last, start + hidden.shape[0])
    if begin > end:
        return
    logprobs = compute_logits(hidden[begin - 1 - start : end - start]).log_softmax(-1)
    targets = torch.tensor(seq.token_ids[begin : end + 1], device=logprobs.device)
    chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
    k = seq.params.prompt_logprobs
    top_vals, top_ids = logprobs.topk(k) if k else (logprobs[:, :0], logprobs[:, :0].long())
    for token, logprob, ids, vals in zip(targets.tolist(), chosen, top_ids.tolist(), top_vals.tolist()):
        seq.prompt_logprobs.append(TokenLogprob(token, logprob, list(zip(ids, vals))))


def take(seq: Sequence) -> list[TokenLogprob | None] | None:
    """The prompt's logprobs (None for its first token, which nothing precedes) once they are
    all recorded, and only the first time; else None."""
    if not wanted(seq) or seq.prompt_logprobs_sent or len(seq.prompt_logprobs) < seq.prompt_len - 1:
        return None
    seq.prompt_logprobs_sent = True
    return [None, *seq.prompt_logprobs]
