"""KV cache formats: what one layer's paged cache holds for each --kv-cache-dtype.

Every tensor indexed by block keeps the pool's paged layout (first axis: block id), so
block ids, sharing, forking and prefix caching work the same for every dtype. Encodings
are defined in kernels/kv_quant.py.

| dtype    | K and V codes                | metadata (per layer)                              |
|----------|------------------------------|---------------------------------------------------|
| auto     | model dtype [nb, bs, h, d]   | none                                              |
| fp8_e4m3 | float8_e4m3fn [nb, bs, h, d] | scale fp16 [nb, bs, h] for K and for V            |
| int8     | uint8 [nb, bs, h, d]         | scale fp16 + zero uint8 [nb, bs, h], K and V      |
| int4     | uint8 [nb, bs, h, d/2]       | K: scale + min fp16 [nb, h, d] (per channel);     |
| int2     | uint8 [nb, bs, h, d/4]       | V: scale fp16 + zero uint8 [nb, bs, h];           |
|          |                              | ring K, V in model dtype [slots*R, bs, h, d]; |
|          |                              | int2: sink uint8 [nb, 2, h, d] (K, V), scale fp16 |
|          |                              | + zero uint8 [nb, 2, h]                           |

int4 and int2 follow KIVI: a block's keys are quantized per channel over the block's tokens
(keys have outlier channels: one range per token and head costs int4 +17% perplexity on the
default model, one per channel +2%, benchmarks/kv_quality_bench.py), so a block can only be
quantized once it is full. Until then its tokens live in full precision in the sequence's
ring (one per sequence, not per block): a ring of R = `ring_blocks` blocks, block
b of the sequence in ring row slot * R + b % R. Attention reads a sequence's positions from its
ring start on from there: the start of its last R - 1 full blocks and its partial one, but
never before the first block it wrote itself (after a prefix-cache hit, the hit's blocks have
no ring copy). The rows to read, in position order, are the plan's `ring_tables`.

int2 also keeps each block's first token at int8 ("sink"). Only a sequence's position 0 is read
from it, the attention sink every later token attends to strongly; it is stored with each block
because block 0 is shared by prefix caching like any other. On the default model, the ring
and the sink each cut int2's perplexity increase, and together most: compare `int2_rotated_only`,
`int2_residual_*`, `int2_sink_*` and `int2` (as built) in
benchmarks/results/kv_quant_what_if_cpu.json (CPU, float32); as built on an H100 in bf16,
benchmarks/results/kv_quality_decode_NVIDIA_H100_80GB_HBM3.json.

fp8_e4m3 and int2 store each head's K and V rotated by an orthogonal matrix, which shrinks
their error (kernels/kv_rotation.py); the kernels read and write them like the others.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wattserve.kernels.kv_rotation import rotation

KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "int8", "int4", "int2")
# KIVI keys share one range per channel per block: 64 tokens keep that range's metadata small
# (tokens held against bf16: `capacity` in benchmarks/results/kv_quality_decode_*.json) and
# match KIVI's residual length order.
KIVI_DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int = 0  # 0: stored in the model dtype
    fp8: bool = False
    kivi: bool = False  # int4/int2: per-channel keys, full-precision ring of the last blocks
    rotated: bool = False  # K and V stored rotated (kernels/kv_rotation.py)
    ring_blocks: int = 0  # KIVI: R, the blocks of the ring
    sink: bool = False  # position 0 read from its block's int8 copy

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    def codes_dim(self, head_dim: int) -> int:
        return head_dim * self.bits // 8 if self.quantized and not self.fp8 else head_dim


FORMATS = {
    "auto": KVFormat("auto"),
    "fp8_e4m3": KVFormat("fp8_e4m3", 8, fp8=True, rotated=True),
    "int8": KVFormat("int8", 8),
    "int4": KVFormat("int4", 4, kivi=True, ring_blocks=1),
    "int2": KVFormat("int2", 2, kivi=True, rotated=True, ring_blocks=2, sink=True),
}


def kv_format(name: str) -> KVFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown KV cache dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return FORMATS[name]


def default_block_size(name: str) -> int:
    return KIVI_DEFAULT_BLOCK_SIZE if kv_format(name).kivi else 16


@dataclass
class LayerKVCache:
    """One layer's cache. Tensors absent from a format are None."""

    fmt: KVFormat
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None  # KIVI: the per-channel minimum (fp16)
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    k_ring: torch.Tensor | None = None  # KIVI: ring rows [slots * R, bs, h, d]
    v_ring: torch.Tensor | None = None
    sink: torch.Tensor | None = None  # `sink` formats: each block's first K and V, int8 [nb, 2, h, d]
    sink_scale: torch.Tensor | None = None  # [nb, 2, h] fp16
    sink_zero: torch.Tensor | None = None  # [nb, 2, h] uint8
    rotation: torch.Tensor | None = None  # `rotated` formats: R [d, d] in the model dtype

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    def block_tensors(self) -> list[torch.Tensor]:
        """Every tensor whose first axis is the block id."""
        return [t for t in (self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero, self.sink,
                            self.sink_scale, self.sink_zero) if t is not None]

    def copy_block(self, src: int, dst: int) -> None:
        for t in self.block_tensors():
            t[dst] = t[src]

    def copy_ring(self, src: int, dst: int) -> None:
        """Residual slot src's ring to slot dst's."""
        r = self.fmt.ring_blocks
        self.k_ring[dst * r : (dst + 1) * r] = self.k_ring[src * r : (src + 1) * r]
        self.v_ring[dst * r : (dst + 1) * r] = self.v_ring[src * r : (src + 1) * r]


def allocate_layer(fmt: KVFormat, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device, num_rings: int = 0) -> LayerKVCache:
    def zeros(*shape, dt=dtype):
        return torch.zeros(*shape, dtype=dt, device=device)

    paged = (num_blocks, block_size, num_kv_heads)
    if not fmt.quantized:
        return LayerKVCache(fmt, zeros(*paged, head_dim), zeros(*paged, head_dim))
    codes_dtype = torch.float8_e4m3fn if fmt.fp8 else torch.uint8
    n = fmt.codes_dim(head_dim)
    cache = LayerKVCache(fmt, zeros(*paged, n, dt=codes_dtype), zeros(*paged, n, dt=codes_dtype),
                         v_scale=zeros(*paged, dt=torch.float16),
                         rotation=rotation(head_dim, dtype, device) if fmt.rotated else None)
    if fmt.kivi:
        cache.k_scale = zeros(num_blocks, num_kv_heads, head_dim, dt=torch.float16)
        cache.k_zero = zeros(num_blocks, num_kv_heads, head_dim, dt=torch.float16)
        ring = (num_rings * fmt.ring_blocks, block_size, num_kv_heads, head_dim)
        cache.k_ring, cache.v_ring = zeros(*ring), zeros(*ring)
    else:
        cache.k_scale = zeros(*paged, dt=torch.float16)
    if not fmt.fp8:
        cache.v_zero = zeros(*paged, dt=torch.uint8)
        if not fmt.kivi:
            cache.k_zero = zeros(*paged, dt=torch.uint8)
    if fmt.sink:
        cache.sink = zeros(num_blocks, 2, num_kv_heads, head_dim, dt=torch.uint8)
        cache.sink_scale = zeros(num_blocks, 2, num_kv_heads, dt=torch.float16)
        cache.sink_zero = zeros(num_blocks, 2, num_kv_heads, dt=torch.uint8)
    return cache


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_per_block(fmt: KVFormat, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """One layer's bytes for one block, metadata included (sized on a one-block meta cache)."""
    one = allocate_layer(fmt, 1, block_size, num_kv_heads, head_dim, dtype, torch.device("meta"))
    return _nbytes(one.block_tensors())


def bytes_per_ring(fmt: KVFormat, block_size: int, num_kv_heads: int, head_dim: int,
                            dtype: torch.dtype) -> int:
    """One layer's bytes for one sequence's full-precision ring (KIVI formats only)."""
    if not fmt.kivi:
        return 0
    one = allocate_layer(fmt, 0, block_size, num_kv_heads, head_dim, dtype, torch.device("meta"), 1)
    return _nbytes((one.k_ring, one.v_ring))
