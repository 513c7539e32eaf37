"""Turn each sequence's next-token logits into a token, following its SamplingParams.

Order: penalties and logit_bias on the raw logits -> greedy argmax, or temperature, top-k,
min-p, top-p and a draw. Logprobs reported to the client are those of the raw model
distribution (before penalties and temperature), as vLLM reports them by default.

Sampling stays on the device and returns without waiting for it (`SampledTokens`); the host
reads the tokens once, in `resolve()`, so the engine can launch the next step first
(engine/core.py). Only seeded draws (a CPU generator per sequence) read logits on the host.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from wattserve.engine.host_to_device import device_tensor
from wattserve.engine.request import TokenLogprob
from wattserve.engine.sequence import Sequence
from wattserve.engine.structured.bitmask import mask_logits


@dataclass
class SampledTokens:
    """One step's tokens, on their way to the host."""

    tokens: torch.Tensor  # [rows] int64 on the device: the next step's inputs can read them there
    host: torch.Tensor  # the same, copied to (pinned) host memory without waiting
    copied: torch.cuda.Event | None  # recorded after that copy; None on CPU
    raw_logprobs: torch.Tensor | None  # [rows, vocab], when some row asked for logprobs
    top_logprobs: list[int | None]  # each row's `logprobs` parameter

    def resolve(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for the tokens; one token (and its logprobs, if asked) per row."""
        if self.copied is not None:
            self.copied.synchronize()
        token_list = self.host.tolist()
        logprobs = [
            None if k is None else _token_logprob(self.raw_logprobs[i], token_list[i], k)
            for i, k in enumerate(self.top_logprobs)
        ]
        return token_list, logprobs


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """logits: [len(seqs), vocab] float32 -> one token per row, still on the device."""
        top_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in top_logprobs) else None
        logits = mask_logits(self._adjust(logits, seqs), seqs)
        tokens = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            index = device_tensor(rows, torch.long, logits.device)
            probs = _filtered_probs(logits[index], [seqs[i].params for i in rows])
            tokens[index] = _draw(probs, [seqs[i].generator for i in rows])
        copied = None
        if tokens.is_cuda:
            host = tokens.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host = tokens
        return SampledTokens(tokens, host, copied, raw_logprobs, top_logprobs)

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
                seen = device_tensor(sorted(set(seq.token_ids)), torch.long, row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                # OpenAI's rule, over output tokens only.
                counts = Counter(seq.output_token_ids)
                if counts:
                    ids = device_tensor(list(counts), torch.long, row.device)
                    n = device_tensor(list(counts.values()), row.dtype, row.device)
                    row[ids] -= n * p.frequency_penalty + p.presence_penalty
            if p.logit_bias:
                ids = device_tensor(list(p.logit_bias), torch.long, row.device)
                row[ids] += device_tensor(list(p.logit_bias.values()), row.dtype, row.device)
            if seq.num_output_tokens < p.min_tokens:
                row[device_tensor(self.eos_token_ids + p.stop_token_ids, torch.long, row.device)] = float("-inf")
        return logits


def reads_own_tokens(seq: Sequence) -> bool:
    """Penalties read the sequence's earlier tokens, and a grammar's next mask needs the last
    one accepted, so its next draw needs the last token on the host first: the engine launches
    the forward pass ahead and draws after reading that token (engine/core.py)."""
    p = seq.params
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                or p.structured is not None)


def _adjusts(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.logit_bias
                or seq.num_output_tokens < p.min_tokens)


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, then top-k, min-p and top-p masks; returns normalized probabilities."""
    temps = device_tensor([p.temperature for p in params], logits.dtype, logits.device)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = device_tensor([k or logits.shape[-1] for k in top_k], torch.long, logits.device)
        kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None].clamp(max=logits.shape[-1] - 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        floor = device_tensor(min_p, probs.dtype, probs.device)[:, None] * probs.max(-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop = before >= device_tensor(top_p, probs.dtype, probs.device)[:, None]
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    out = torch.empty(len(generators), dtype=torch.long, device=probs.device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        index = device_tensor(free, torch.long, probs.device)
        out[index] = torch.multinomial(probs[index], 1).squeeze(-1)
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
