"""GGUF's block-quantized tensors repacked into kernels/weight_format.py, codes unchanged.

A GGUF row is a run of 32-weight blocks, each a float16 scale (Q4_1: and a float16 minimum)
followed by the codes; Q4_0/Q4_1 hold weight i of a block in byte i's low nibble and weight
i + 16 in byte i's high one. We split the scales and codes into planes and pair the codes by
neighbouring columns: the same bits, laid out for aligned loads.

K-quants (256-weight super-blocks) scale each sub-block by a 6-bit (Q6_K: 8-bit) integer
times the super-block's float16 scale; we multiply those out into one float32 scale (and
offset) per sub-block, exact, so the kernels read K-quants as they read Q4_1 (Q4_K) or int8
codes with offsets (Q5_K, Q6_K): 6, 10 and 10 bits a weight against the file's 4.5, 5.5 and
6.6, dense bf16's 16.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from wattserve.kernels.weight_format import QuantizedWeight, pack_u4

BLOCK = 32
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}
_SUPER_BLOCK_BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}
FORMATS = frozenset(_BLOCK_BYTES) | frozenset(_SUPER_BLOCK_BYTES)


def blocks_to_weight(data: np.ndarray, qtype: Q) -> QuantizedWeight:
    """data: [N, K / 32 * bytes per block] uint8, the tensor as stored -> a [N, K] weight."""
    if qtype in _SUPER_BLOCK_BYTES:
        return _k_quant_to_weight(data, qtype)
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


def _k_quant_to_weight(data: np.ndarray, qtype: Q) -> QuantizedWeight:
    """Per sub-block scale and offset from the super-block's bytes; each weight's code read
    back from gguf's own dequantization, (w - offset) / scale, which it computed as
    code * scale + offset: exact after rounding."""
    n = data.shape[0]
    blocks = data.reshape(-1, _SUPER_BLOCK_BYTES[qtype])
    if qtype == Q.Q6_K:  # ql[128] qh[64] scales[16] (int8) d: 16-weight sub-blocks, codes -32..31
        group, offsets = 16, None
        scales = _f32(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    else:  # d dmin scales[12] (6-bit scales and minimums) ...: 32-weight sub-blocks
        group = BLOCK
        sc, mins = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scales = _f32(blocks[:, 0:2]) * sc.astype(np.float32)
        offsets = (-_f32(blocks[:, 2:4]) * mins.astype(np.float32)).reshape(n, -1)
    scales = scales.reshape(n, -1)
    dense = gguf.quants.dequantize(data, qtype).reshape(n, -1, group)
    shifted = dense if offsets is None else dense - offsets[..., None]
    codes = np.rint(shifted / np.where(scales == 0, 1, scales)[..., None]).reshape(n, -1)
    source = f"gguf {qtype.name}"
    offsets = None if offsets is None else torch.from_numpy(offsets)
    if qtype == Q.Q4_K:
        return QuantizedWeight("u4", pack_u4(torch.from_numpy(codes)), torch.from_numpy(scales), group, offsets,
                               source=source)
    return QuantizedWeight("i8", torch.from_numpy(codes.astype(np.int8)), torch.from_numpy(scales), group, offsets,
                           source=source)


def _f16(two_bytes: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float16."""
    return torch.from_numpy(np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].copy())


def _f32(two_bytes: np.ndarray) -> np.ndarray:
    """[B, 2] uint8 holding a float16 -> [B, 1] float32."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)
