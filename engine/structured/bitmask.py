"""Each step's allowed-token masks: filled on the host by the sequences' matchers, applied to
the logits on the device by vectorized ops (no loop over the vocabulary).

A mask is xgrammar's packed layout, bit j of int32 word w allowing token 32 * w + j. The host
fills it after the step's forward pass was launched, so on CUDA the filling overlaps the GPU's
work; the device unpacks it against the 32 bit values.
"""
from __future__ import annotations

import torch

from wattserve.engine.host_to_device import device_tensor
from wattserve.engine.sequence import Sequence


def mask_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [len(seqs), vocab] -> the same values, -inf wherever a constrained sequence's
    grammar forbids the token (a new tensor when any row is constrained)."""
    # A sequence that ended on the token read before this draw has a finished matcher; its
    # token is dropped, so its row is left as it is.
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None and seq.finish_reason is None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.empty(len(rows), (vocab + 31) // 32, dtype=torch.int32,
                          pin_memory=logits.is_cuda)
    for k, i in enumerate(rows):
        seqs[i].grammar.fill_next_token_bitmask(bitmask, k)
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), vocab)
    if len(rows) == len(seqs):
        return torch.where(allowed, logits, float("-inf"))
    index = device_tensor(rows, torch.long, logits.device)
    logits = logits.clone()
    logits[index] = torch.where(allowed, logits[index], float("-inf"))
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask: [rows, ceil(vocab / 32)] int32 -> allowed: [rows, vocab] bool, on its device."""
    # One AND against each bit's value (bit 31's is int32's minimum) and one compare: half
    # the CPU time of shifting, masking and casting (measured, 16 x 49,152).
    bit_values = device_tensor([1 << i for i in range(31)] + [-(1 << 31)], torch.int32, bitmask.device)
    return ((bitmask[:, :, None] & bit_values) != 0).flatten(1)[:, :vocab]

