"""The limits a GPU benchmark sets its results against, measured in the same run: a large
bf16 matmul (FLOP/s, the ceiling of prefill) and a device-to-device copy (bytes/s, the
ceiling of reading the weights in decode); and the work a Llama-family model does per token,
counted from its parameters."""
from __future__ import annotations

import time

import torch

from wattserve.engine.config import ModelConfig
from wattserve.kernels.weight_format import weight_bytes


def cuda_time(fn, warmup: int = 10, iters: int = 30) -> float:
    """Median seconds of fn() with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn(i) for i in range(reps), captured in one CUDA graph: the GPU's
    time alone, as a decode step's graph replays it, without the host's launch cost."""
    for i in range(reps):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    return cuda_time(graph.replay, warmup=3, iters=20) / reps


def host_time(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() by the host's clock (CPU work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str | torch.device = "cuda") -> float:
    """Bytes/s of a 2 GiB device-to-device copy (on CPU, 64 MiB), counting bytes read and written."""
    cuda = torch.device(device).type == "cuda"
    src = torch.randn(2**29 if cuda else 2**24, device=device)  # float32
    dst = torch.empty_like(src)
    t = (cuda_time if cuda else host_time)(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_time(lambda: a @ b)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Weight bytes one decode step must read, whatever its batch: every matrix once in its
    stored format, of the embedding table only the rows looked up (negligible, so none counted)."""
    embed = model.embed_tokens.weight
    return weight_bytes(model) - embed.numel() * embed.element_size()


def prefill_flops(model: torch.nn.Module, config: ModelConfig, prompt_len: int) -> float:
    """FLOPs of one prompt's prefill: the layers' matrices for every token, causal attention
    (QK^T and PV over the lower triangle), and the lm_head for the one sampled token."""
    # Shapes, not parameters: a quantized weight (kernels/weight_format.py) is a module.
    layer_params = sum(m.weight.shape.numel() for n, m in model.named_modules()
                       if n.startswith("layers.") and n.endswith("_proj"))
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * prompt_len * (prompt_len + 1) / 2
    return 2 * layer_params * prompt_len + attention + 2 * config.hidden_size * config.vocab_size
