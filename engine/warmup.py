"""Run every shape and path serving will use once at startup, so that no request waits for a compile.

What compiles or loads lazily on CUDA, and what covers it here:
  - Triton kernels specialize on constexprs and on integer arguments (== 1, multiples of 16):
    the skinny matmul (kernels/triton_gemv.py) on its row count M in {1, 2..15, 16}, for each
    weight and for the LM head (M = the step's sampled rows); the prefill attention kernel on
    its tile (BLOCK_M from the longest query: 16..128). Prompts of 1, 2, 4, ... tokens up to
    the step budget (`_ladder`) give every tile and every M of the layers; decode batches of
    every CUDA-graph size (`_batch_sizes`) every M of the LM head. The attention kernels'
    other per-step integers are not specialized (see their @triton.jit).
  - cuBLAS (steps over 16 tokens) picks and loads a kernel per shape: the ladder's powers of
    two bucket them.
  - Decode steps replay CUDA graphs captured (and compiled) before this runs; with
    --enforce-eager the batch sizes above run the decode kernel, split or not.
  - The sampler's paths (`_sampling`): greedy, temperature with top-p, top-k and min-p,
    penalties (which also step without launching ahead), logit bias and min_tokens, logprobs,
    a seeded draw, and n > 1 forks (a copied block, and a copied ring for KIVI).
  - The KV cache's write kernel of its dtype runs in every step; KIVI's ring flush in every
    prefill that fills a block; prefill over cached blocks on a prefix-cache hit (`_prefix_hit`).
On CPU the ops are PyTorch's references: the same ATen kernels for every shape, nothing to
compile, and a step of the default model takes a good part of a second on a small machine (the
tests start many engines). There only the sampling wave runs, three steps: every sampler path
once, and the warm-up's own mechanics (requests in, the engine restored) run at every start.

The engine is left as it was found: no request, every block free, the prefix cache empty (the
warm-up prompts must not serve user prompts), the preemption count and the random number
generators restored. It runs from EngineCore.__init__, before a server or benchmark can attach
observers or an energy meter, so no step or request of it is counted anywhere.
"""
from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

import torch

from wattserve.engine.cuda_graphs import graph_batch_sizes
from wattserve.engine.request import SamplingParams

if TYPE_CHECKING:
    from wattserve.engine.core import EngineCore

_ID_PREFIX = "warm-up-"  # for logs; no user request exists while warm-up runs, so none can clash

Wave = list[tuple[list[int], SamplingParams]]  # requests submitted together, run to completion


def warm_up(core: EngineCore, full: bool | None = None) -> float:
    """Drive `core` through every shape and path above (`full`; default: on CUDA), or only the
    sampler's paths; returns the seconds taken."""
    assert not core.has_work() and not core.observers, "warm up a fresh engine, before it serves"
    start = time.monotonic()
    preemptions = core.scheduler.num_preemptions
    cuda = core.device.type == "cuda"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(core.device) if cuda else None
    ids = itertools.count()
    for wave in waves(core, cuda if full is None else full):
        for prompt, params in wave:
            core.add_request(f"{_ID_PREFIX}{next(ids)}", prompt, params)
        while core.has_work():
            core.step()
    core.kv.pool.forget_cached()
    core.scheduler.num_preemptions = preemptions
    torch.set_rng_state(rng[0])
    if cuda:
        torch.cuda.set_rng_state(rng[1], core.device)
    return time.monotonic() - start


def waves(core: EngineCore, full: bool) -> list[Wave]:
    prompts = _Prompts(core.model_config.vocab_size)
    if not full:
        return [_sampling(core, prompts)]
    return [*_ladder(core, prompts), _batch_sizes(core, prompts), _sampling(core, prompts), *_prefix_hit(core, prompts)]


class _Prompts:
    """Distinct synthetic prompts: each starts from its own token, so none shares a cached block
    with another unless asked to."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.count = itertools.count(1)

    def __call__(self, length: int) -> list[int]:
        first = next(self.count) * 7919
        return [(first + 13 * i) % self.vocab_size for i in range(length)]


def _params(max_tokens: int, **kwargs) -> SamplingParams:
    # ignore_eos: a warm-up request runs its planned number of steps whatever it draws.
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **{"temperature": 0.0, **kwargs})


def _ladder(core: EngineCore, prompts: _Prompts) -> list[Wave]:
    """One request at a time, so each prefill is a step of exactly that many tokens: 1, 2, 4, ...
    and the step budget itself; then one decode step at its context."""
    longest = min(core.config.scheduler.max_num_batched_tokens, core.max_model_len - 2)
    lengths = [n for n in sorted({2**k for k in range(longest.bit_length())} | {longest}) if n > 0]
    return [[(prompts(n), _params(2))] for n in lengths]


def _batch_sizes(core: EngineCore, prompts: _Prompts) -> Wave:
    """max_num_seqs short requests whose lengths make the decode batch shrink through every
    CUDA-graph batch size, largest first: request i decodes while the batch is larger than i."""
    sizes = graph_batch_sizes(core.config.scheduler.max_num_seqs)
    length = min(4, core.max_model_len - 1)
    return [(prompts(1 + i % length), _params(min(1 + sum(s > i for s in sizes), core.max_model_len - length)))
            for i in range(sizes[-1])]


def _sampling(core: EngineCore, prompts: _Prompts) -> Wave:
    """One request per sampler path, in one batch (greedy and drawn rows side by side). Prompts
    end inside a block, so a fork copies a partly filled block."""
    length = max(1, min(3, core.kv.block_size - 1, core.max_model_len - 4))
    vocab = core.model_config.vocab_size
    variants = [
        {"temperature": 0.8, "top_p": 0.9}, {"temperature": 0.8, "top_k": 20}, {"temperature": 0.8, "min_p": 0.05},
        {"repetition_penalty": 1.2}, {"presence_penalty": 0.5, "frequency_penalty": 0.5},
        {"logit_bias": {vocab - 1: 1.0}, "min_tokens": 2}, {"logprobs": 2}, {"temperature": 0.8, "seed": 0},
        {"temperature": 0.8, "n": 2}, {"n": 2},
    ]
    return [(prompts(length), _params(3, **v)) for v in variants]


def _prefix_hit(core: EngineCore, prompts: _Prompts) -> list[Wave]:
    """A prompt, then a longer one that starts with it: the second starts from the first's cached
    blocks and prefills the rest over them. Long enough for a hit even where a KIVI ring
    recomputes its last blocks (KVCacheManager.prefix_to_reuse)."""
    length = (core.kv.ring_blocks + 1) * core.kv.block_size + 1
    if not core.kv.enable_prefix_caching or length + 4 > core.max_model_len:
        return []
    prompt = prompts(length)
    return [[(prompt, _params(2))], [(prompt + prompts(2), _params(2))]]
