"""Owns the model and the KV cache tensors; turns a scheduled batch into flat tensors and logits."""
from __future__ import annotations

import torch

from wattserve.engine.config import CacheConfig, ModelConfig
from wattserve.engine.cuda_graphs import DecodeGraphs
from wattserve.engine.gpu_timer import GpuBusyTimer
from wattserve.engine.host_to_device import device_tensor
from wattserve.engine.kivi_plan import kivi_plan
from wattserve.engine.models.llama import LlamaModel
from wattserve.engine.prompt_logprobs import score
from wattserve.engine.step_input import StepInput, StepOutput
from wattserve.engine.tensor_parallel import Shard, local_config
from wattserve.engine.tp_weights import shard_weights
from wattserve.engine.weight_loading import load_weights
from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.dispatch import ops_for
from wattserve.kernels.kv_format import (
    KVFormat,
    LayerKVCache,
    allocate_layer,
    bytes_per_block,
    bytes_per_ring,
)

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
_ACTIVATION_RESERVE = 2 << 30


class ModelRunner:
    def __init__(self, model_config: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                 kv_format: KVFormat, shard: Shard = Shard()):
        """`model_config`: the whole model's; `shard`: the part of it this runner holds
        (engine/tensor_parallel.py), by default all of it."""
        self.full_config, self.shard = model_config, shard
        self.model_config = model_config = local_config(model_config, shard.size)
        self.kv_format = kv_format
        self.dtype = dtype
        self.device = device
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build parameters directly in the target dtype
        try:
            with torch.device(device):
                self.model = LlamaModel(model_config, ops_for(device), max_positions, shard)
        finally:
            torch.set_default_dtype(previous)
        self.model.eval()
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        self.graphs: DecodeGraphs | None = None
        self.gpu_timer = GpuBusyTimer(device)

    def load(self, weights, quantization: str, seed: int) -> None:
        """The checkpoint's (name, tensor) stream (None: random weights from `seed`), cut to
        this runner's shard, in the format `quantization` asks for (engine/weight_loading.py)."""
        load_weights(self.model, shard_weights(weights, self.full_config, self.shard), quantization,
                     self.device, seed)

    def close(self) -> None:
        """Stop what the runner started: nothing on one rank (engine/tp_runner.py stops the
        other ranks)."""

    # ---- KV cache ----------------------------------------------------------------------
    def bytes_per_block(self, block_size: int) -> int:
        """All layers' K and V of one block, in the cache's format, scales included."""
        c = self.model_config
        return c.num_layers * bytes_per_block(self.kv_format, block_size, c.num_kv_heads, c.head_dim, self.dtype)

    def bytes_per_ring(self, block_size: int) -> int:
        c = self.model_config
        return c.num_layers * bytes_per_ring(self.kv_format, block_size, c.num_kv_heads, c.head_dim,
                                                      self.dtype)

    def num_blocks_for(self, cache: CacheConfig, num_rings: int = 0) -> int:
        """Blocks that fit in `--kv-cache-memory`; unset, on CUDA, what is left of
        `memory_fraction` of the device's memory once the weights are in (vLLM's rule), and
        on CPU a fixed default, since host memory is shared with everything else. KIVI's
        rings come out of the same budget."""
        budget = cache.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # A fixed reserve for one step's activations (up to max_num_batched_tokens).
            budget = int(total * cache.memory_fraction) - (total - free) - _ACTIVATION_RESERVE
        elif budget is None:
            budget = CPU_DEFAULT_KV_CACHE_BYTES
        budget -= num_rings * self.bytes_per_ring(cache.block_size)
        return max(0, budget // self.bytes_per_block(cache.block_size))

    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_rings: int = 0) -> None:
        c = self.model_config
        self.block_size = block_size
        self.kv_caches = [
            allocate_layer(self.kv_format, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype,
                           self.device, num_rings)
            for _ in range(c.num_layers)
        ]

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """CUDA only: record decode steps for batch sizes up to max_num_seqs."""
        c = self.model_config
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, -(-max_model_len // self.block_size),
                                   c.hidden_size, self.dtype, self.device)
        self.graphs.capture()

    def copy_block(self, src: int, dst: int) -> None:
        for cache in self.kv_caches:
            cache.copy_block(src, dst)

    def copy_ring(self, src: int, dst: int) -> None:
        for cache in self.kv_caches:
            cache.copy_ring(src, dst)

    # ---- a step ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, inputs: StepInput, ahead_tokens: torch.Tensor | None = None) -> StepOutput:
        """Run the step: logits [num_sampling, vocab] for the sequences that draw a token
        (`inputs.samples`), in batch order, and the prompt logprobs asked for; then make the
        step's fork copies. ahead_tokens: the
        device tokens of the step still in flight, which `inputs.ahead` points into, so that
        the host need not read them first."""
        input_ids, positions, meta, sample_rows = self._prepare(inputs, ahead_tokens)
        span = self.gpu_timer.start()  # after _prepare: building inputs on the host is GPU idle time
        if self.graphs is not None and meta.max_query_len == 1 and self.graphs.fits(inputs.num_seqs):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[sample_rows])
        prompt_logprobs = score(self.model.compute_logits, hidden, inputs.prompt_scorings)
        for src, dst in inputs.block_copies:
            self.copy_block(src, dst)
        for src, dst in inputs.ring_copies:
            self.copy_ring(src, dst)
        if span is not None:
            span.stop()
        return StepOutput(logits, span, prompt_logprobs)

    def _prepare(self, inputs: StepInput, ahead_tokens: torch.Tensor | None = None):
        bs = self.block_size
        pos, slots, starts, ctx_lens, sample_rows = [], [], [0], [], []
        for start, n, table, samples in zip(inputs.starts, inputs.num_new, inputs.tables, inputs.samples):
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            starts.append(starts[-1] + n)
            ctx_lens.append(start + n)
            if samples:
                sample_rows.append(starts[-1] - 1)
        width = max(len(t) for t in inputs.tables)
        padded = [t + [0] * (width - len(t)) for t in inputs.tables]

        def t(x, dtype=torch.long):
            return device_tensor(x, dtype, self.device)

        meta = AttentionMetadata(
            slot_mapping=t(slots),
            block_tables=t(padded, torch.int32),
            context_lens=t(ctx_lens, torch.int32),
            query_start_loc=t(starts, torch.int32),
            query_lens=list(inputs.num_new),
            context_lens_host=ctx_lens,
        )
        if self.kv_format.kivi:
            meta.kivi = kivi_plan(inputs.starts, inputs.num_new, inputs.tables, inputs.rings, bs,
                                  self.kv_format.ring_blocks, self.device)
        input_ids = t(inputs.token_ids)
        if inputs.ahead:
            at, rows = zip(*inputs.ahead)
            input_ids[t(list(at))] = ahead_tokens[t(list(rows))]
        return input_ids, t(pos), meta, t(sample_rows)
