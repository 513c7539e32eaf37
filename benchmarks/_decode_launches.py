"""Each launch of a batch-1 decode step that reads weights or a KV cache, timed alone at a
model's shapes, beside its bytes / copy bandwidth: the decode kernel table names kernels
(`_gemv_kernel` is qkv, o_proj and the lm_head alike), this says which shape costs what
and what another split would. benchmarks/moe_bench.py runs it on Qwen3-30B-A3B's shapes.

On CUDA each row is a CUDA graph of 20 launches in a row (PDL as in the model's graph), over
enough copies of the weight to stream past the 50 MB L2 as the model's 48 layers do; on CPU
(--tiny) the same calls run once through Triton's interpreter, so the script cannot rot.
"""
from __future__ import annotations

import torch
import triton
from _roofline import graph_time, host_time

from wattserve.kernels.triton_attention_decode import default_num_splits, paged_decode_attention
from wattserve.kernels.triton_gemv import DEFAULT_CONFIG, gemv_triton, split_k
from wattserve.kernels.triton_moe_routing import route_triton
from wattserve.kernels.triton_norm import add_rms_norm_triton

L2_PAST = 200 << 20  # bytes of weight copies a timing rotates through: 4x the H200's L2
GEMV_SPLITS = (1, 2, 4, 8)  # K splits timed beside the default's
BLOCK_SIZE = 16  # the engine's KV block for bf16 (engine/config.py)


def _seconds(fn, device: torch.device) -> float:
    """Seconds per call of fn(i), as a decode graph replays it (CUDA) or once (CPU)."""
    if device.type == "cuda":
        return graph_time(fn)
    return host_time(lambda: fn(0), warmup=0, iters=1)


def _copies(make, nbytes: int, device: torch.device) -> list[torch.Tensor]:
    """Weights to rotate through: past the L2 on CUDA, one on CPU."""
    count = max(2, -(-L2_PAST // nbytes)) if device.type == "cuda" else 1
    return [make() for _ in range(count)]


def _row(part: str, programs: int, nbytes: int, seconds: float, copy_bytes_s: float, **extra) -> dict:
    floor = nbytes / copy_bytes_s
    row = {"part": part, "programs": programs, "bytes": nbytes, "us": round(seconds * 1e6, 2),
           "copy_floor_us": round(floor * 1e6, 3), "fraction_of_copy": round(floor / seconds, 3), **extra}
    print(f"  {part:<40}{programs:>6}{nbytes / 1e6:>9.2f}{row['us']:>11}{row['copy_floor_us']:>9}"
          f"{row['fraction_of_copy']:>8.1%}")
    return row


def gemv_rows(name: str, n: int, k: int, device, dtype, copy_bytes_s: float,
              split_choices: tuple[int, ...] = GEMV_SPLITS) -> list[dict]:
    """The decode GEMV on an [n, k] weight at one row: the default split, then each other one
    of `split_choices` (the same sums in another order: a choice for split_k, not for accuracy)."""
    gen = torch.Generator(device=device).manual_seed(0)
    nbytes = n * k * torch.finfo(dtype).bits // 8
    ws = _copies(lambda: (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype), nbytes, device)
    x = torch.randn(1, k, device=device, generator=gen).to(dtype)
    block_n, block_k = DEFAULT_CONFIG[:2]
    default = split_k(n, k, block_n, block_k, device)[0]
    rows = []
    for splits in (None, *(s for s in split_choices if s != default and s * 2 * block_k <= k)):
        actual = split_k(n, k, block_n, block_k, device, splits)[0]
        seconds = _seconds(lambda i: gemv_triton(x, ws[i % len(ws)], splits=splits), device)
        label = f"{name} [{n}x{k}] splits {actual}" + (" (default)" if splits is None else "")
        rows.append(_row(label, triton.cdiv(n, block_n) * actual, nbytes, seconds, copy_bytes_s,
                         matrix=name, splits=actual, default=splits is None))
    return rows


def decode_launch_rows(config: dict, context: int, max_model_len: int, device: torch.device,
                       copy_bytes_s: float) -> list[dict]:
    """One decoder layer's weight and cache reads and the lm_head, each alone, at `config`'s
    shapes (a HF config dict of a Qwen3-MoE), one sequence at `context` tokens. bf16 on CUDA;
    fp16 on CPU: Triton 3.6's interpreter multiplies bf16 tiles wrongly in tl.dot (a 16x16
    dot of randn values off by 3e10; loads are right), and fp16 takes the same paths."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    gen = torch.Generator(device=device).manual_seed(1)
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    print(f"{'decode launch, alone':<42}{'progs':>6}{'MB':>9}{'us':>11}{'floor':>9}{'of copy':>8}")
    rows = []
    x, res, w = (torch.randn(1, hidden, device=device, generator=gen).to(dtype) for _ in range(3))
    rows.append(_row("add_rms_norm", 1, 4 * hidden * 2, _seconds(lambda i: add_rms_norm_triton(x, res, w, 1e-6),
                                                                 device), copy_bytes_s))
    rows += gemv_rows("qkv_proj", (q_heads + 2 * kv_heads) * head_dim, hidden, device, dtype, copy_bytes_s)

    blocks_per_seq = -(-max_model_len // BLOCK_SIZE)  # the decode graph's block-table width
    k_cache, v_cache = (torch.randn(blocks_per_seq, BLOCK_SIZE, kv_heads, head_dim, device=device,
                                    generator=gen).to(dtype) for _ in range(2))
    table = torch.arange(blocks_per_seq, device=device, dtype=torch.int32)[None]
    lens = torch.tensor([context], device=device, dtype=torch.int32)
    q = torch.randn(1, q_heads, head_dim, device=device, generator=gen).to(dtype)
    kv_bytes = 2 * context * kv_heads * head_dim * 2
    default = default_num_splits(1, kv_heads, triton.cdiv(blocks_per_seq * BLOCK_SIZE, 64), device)
    for splits in sorted({default, 1, 2, 4, 8}):
        seconds = _seconds(lambda i: paged_decode_attention(q, k_cache, v_cache, table, lens, head_dim**-0.5,
                                                            num_splits=splits), device)
        label = f"decode attention splits {splits}" + (" (default)" if splits == default else "") \
            + (" + combine" if splits > 1 else "")
        rows.append(_row(label, kv_heads * splits, kv_bytes, seconds, copy_bytes_s, splits=splits,
                         default=splits == default))
    # A server's graphs are captured with a block table as wide as the model's whole context
    # (max_model_len defaults to max_position_embeddings): the splits are sized for that,
    # whatever the context, and most programs find no tile.
    server_len = config["max_position_embeddings"]
    wide = torch.zeros(1, -(-server_len // BLOCK_SIZE), device=device, dtype=torch.int32)
    wide[0, :blocks_per_seq] = table[0]
    splits = default_num_splits(1, kv_heads, triton.cdiv(wide.shape[1] * BLOCK_SIZE, 64), device)
    seconds = _seconds(lambda i: paged_decode_attention(q, k_cache, v_cache, wide, lens, head_dim**-0.5), device)
    rows.append(_row(f"decode attention, {server_len}-token table, splits {splits}", kv_heads * splits, kv_bytes,
                     seconds, copy_bytes_s, splits=splits, server_table=server_len))

    rows += gemv_rows("o_proj", hidden, q_heads * head_dim, device, dtype, copy_bytes_s)
    rows.append(_row("add_rms_norm", 1, 4 * hidden * 2, _seconds(lambda i: add_rms_norm_triton(x, res, w, 1e-6),
                                                                 device), copy_bytes_s))
    router_bytes = experts * hidden * 2
    routers = _copies(lambda: torch.randn(experts, hidden, device=device, generator=gen).to(dtype), router_bytes,
                      device)
    splits, _ = split_k(experts, hidden, *DEFAULT_CONFIG[:2], device)
    rows.append(_row("route (router GEMV + top-k)", triton.cdiv(experts, DEFAULT_CONFIG[0]) * splits, router_bytes,
                     _seconds(lambda i: route_triton(x, routers[i % len(routers)], top_k, True), device),
                     copy_bytes_s))
    # On CPU a slice of the vocabulary: the interpreter takes 18 s for the tiny model's 49,152 rows.
    vocab = config["vocab_size"] if device.type == "cuda" else 1024
    rows += gemv_rows("lm_head", vocab, hidden, device, dtype, copy_bytes_s, split_choices=())
    return rows


def attribute(rows: list[dict], kernel_rows: list[dict], layers: int) -> list[dict]:
    """Per kernel of the step's table: its us a step against the default rows' sum (each
    layer's launches times `layers`, the lm_head once), so `_gemv_kernel` splits by shape."""
    alone: dict[str, dict[str, float]] = {}

    def add(kernel: str, part: str, us: float) -> None:
        alone.setdefault(kernel, {})
        alone[kernel][part] = alone[kernel].get(part, 0.0) + us

    for r in rows:
        if r.get("default") is False or "server_table" in r:
            continue
        if "matrix" in r:
            add("_gemv_kernel", r["matrix"], r["us"] * (1 if r["matrix"] == "lm_head" else layers))
        elif r["part"].startswith("decode attention"):
            add("_decode_kernel + _combine_splits_kernel", "attention", r["us"] * layers)
        elif r["part"].startswith("route"):
            add("_route_kernel", "route", r["us"] * layers)
        elif r["part"] == "add_rms_norm":
            add("_rms_norm_kernel", "add_rms_norm", r["us"] * layers)
    in_step = {k["kernel"]: k["us_per_step"] for k in kernel_rows}
    in_step["_decode_kernel + _combine_splits_kernel"] = \
        in_step.get("_decode_kernel", 0.0) + in_step.get("_combine_splits_kernel", 0.0)
    out = []
    for kernel, parts in alone.items():
        out.append({"kernel": kernel, "in_step_us": in_step.get(kernel), "alone_sum_us": round(sum(parts.values()), 1),
                    "alone_us_by_part": {p: round(us, 1) for p, us in parts.items()}})
        print(f"  {kernel:<42} in the step {out[-1]['in_step_us']} us, alone {out[-1]['alone_sum_us']} us "
              f"{out[-1]['alone_us_by_part']}")
    return out
