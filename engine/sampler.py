"""Turn each sequence's next-token logits into a token, following its SamplingParams.

Order: penalties and logit_bias on the raw logits -> greedy argmax, or temperature, top-k,
min-p, top-p and a draw. Logprobs reported to the client are those of the raw model
distribution (before penalties and temperature), as vLLM reports them by default.
"""
from __future__ import annotations

from collections import Counter

import torch

from engine.request import TokenLogprob
from engine.sequence import Sequence


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [len(seqs), vocab] float32. Returns one token (and its logprobs) per row."""
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
        logits = self._adjust(logits, seqs)
        tokens = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            probs = _filtered_probs(logits[rows], [seqs[i].params for i in rows])
            tokens[rows] = _draw(probs, [seqs[i].generator for i in rows])
        token_list = tokens.tolist()
        logprobs = [
            _token_logprob(raw_logprobs[i], token_list[i], seqs[i].params.logprobs) if want else None
            for i, want in enumerate(want_logprobs)
        ]
        return token_list, logprobs

    def _adjust(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties, logit_bias and min_tokens, applied only to the rows that ask for them."""
        rows = [i for i, seq in enumerate(seqs) if _adjusts(seq)]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            seq = seqs[i]
            p = seq.params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                # HF's rule over prompt and output: shrink positive logits, grow negative ones.
                seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                # OpenAI's rule, over output tokens only.
                counts = Counter(seq.output_token_ids)
                if counts:
                    ids = torch.tensor(list(counts), device=row.device)
                    n = torch.tensor(list(counts.values()), dtype=row.dtype, device=row.device)
                    row[ids] -= n * p.frequency_penalty + p.presence_penalty
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=row.device)
                row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
            if seq.num_output_tokens < p.min_tokens:
                row[self.eos_token_ids + p.stop_token_ids] = float("-inf")
        return logits


def _adjusts(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.logit_bias
                or seq.num_output_tokens < p.min_tokens)


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, then top-k, min-p and top-p masks; returns normalized probabilities."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = torch.tensor([k or logits.shape[-1] for k in top_k], device=logits.device)
        kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None].clamp(max=logits.shape[-1] - 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        floor = torch.tensor(min_p, device=probs.device)[:, None] * probs.max(-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop = before >= torch.tensor(top_p, device=probs.device)[:, None]
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    out = torch.empty(len(generators), dtype=torch.long, device=probs.device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        out[free] = torch.multinomial(probs[free], 1).squeeze(-1)
    for i, g in enumerate(generators):
        if g is not None:  # seeded rows draw from their own CPU generator, one by one
            out[i] = torch.multinomial(probs[i].cpu(), 1, generator=g).item()
    return out


def _token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top = []
    if k:
        vals, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, logprobs[token].item(), top)
