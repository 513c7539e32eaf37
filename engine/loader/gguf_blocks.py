"""GGUF's block-quantized tensors repacked, without dequantizing, into kernels/weight_format.py.

A GGUF row is a run of 32-weight blocks, each a float16 scale (Q4_1: and a float16 minimum)
followed by the codes; Q4_0/Q4_1 hold weight i of a block in byte i's low nibble and weight
i + 16 in byte i's high one. We split the scales and codes into planes and pair the codes by
neighbouring columns: the same bits, laid out for aligned loads.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from wattserve.kernels.weight_format import QuantizedWeight, pack_u4

BLOCK = 32
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}
FORMATS = frozenset(_BLOCK_BYTES)


def blocks_to_weight(data: np.ndarray, qtype: Q) -> QuantizedWeight:
    """data: [N, K / 32 * bytes per block] uint8, the tensor as stored -> a [N, K] weight."""
    n = data.shape[0]
    blocks = data.reshape(n, -1, _BLOCK_BYTES[qtype])
    scales = _f16(blocks[..., 0:2])
    source = f"gguf {qtype.name}"
    if qtype == Q.Q8_0:
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(n, -1))
        return QuantizedWeight("i8", codes, scales, BLOCK, source=source)
    qs = blocks[..., -16:]
    codes = torch.from_numpy(np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, -1))
    # Q4_0's codes are offset by 8: -8 * scale is exact in float16.
    offsets = _f16(blocks[..., 2:4]) if qtype == Q.Q4_1 else -8 * scales
    return QuantizedWeight("u4", pack_u4(codes), scales, BLOCK, offsets, source=source)


def _f16(two_bytes: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float16."""
    return torch.from_numpy(np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].copy())
