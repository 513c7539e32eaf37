"""Tensor parallelism: the same model on one GPU and split over two, in the same run.

Random weights (bf16, `--load-format dummy`) at Llama-3.1 shapes, each against a limit
measured in the same run:
  1. all-reduce over the ranks (NCCL): latency of a decode step's message ([1, hidden]) and of a
     prefill chunk's, and the bus bandwidth of a 256 MiB one (2 (N-1) / N bytes per rank).
  2. Llama-3.1-8B, TP=1 against TP=N: batch-1 decode tok/s (the issue asks >= 1.6x at N = 2)
     and offline throughput of 256 requests x (512 prompt, 128 output) tokens.
  3. Llama-3.1-70B, TP=N: batch-1 decode tok/s against the weight-bytes roofline over N GPUs:
     each rank's weight bytes read per step at the device-to-device copy bandwidth (the issue
     asks >= 0.70 at N = 2).

`--device cpu --tiny` runs the same sections at toy shapes with gloo ranks on the host
(CI keeps the script working; its timings say nothing about GPUs).

Usage: python benchmarks/tp_bench.py [--tp 2] [--tokenizer DIR] [--skip-70b]
       python benchmarks/tp_bench.py --device cpu --tiny
Writes benchmarks/results/tp_<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _results import write_results
from _roofline import copy_bandwidth, weight_bytes_per_step
from llama8b_config import LLAMA31_8B, TINY_LLAMA, write_checkpoint_dir

from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams

LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
TINY_BIG = {**TINY_LLAMA, "num_hidden_layers": 4}  # --tiny's stand-in for 70B


# ---- 1. all-reduce ------------------------------------------------------------------------
def _all_reduce_rank(rank: int, size: int, store: str, device: str, shapes: list[list[int]], dtype, out: str):
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    results = []
    for shape in shapes:
        x = torch.ones(shape, dtype=dtype, device=dev)
        iters = 50 if x.numel() * x.element_size() < 1 << 24 else 10
        for _ in range(5):
            dist.all_reduce(x)
        _sync(cuda)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        _sync(cuda)
        results.append((time.perf_counter() - start) / iters)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def all_reduce_section(size: int, device: str, hidden: int, chunk_tokens: int, dtype) -> dict:
    big = (256 << 20) // torch.tensor([], dtype=dtype).element_size()
    if device == "cpu":
        big //= 16  # 16 MiB: gloo on shared cores
    shapes = [[1, hidden], [chunk_tokens, hidden], [big]]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(_all_reduce_rank, args=(size, os.path.join(tmp, "store"), device, shapes, dtype, out),
                           nprocs=size, start_method="spawn")
        seconds = json.loads(Path(out).read_text())
    big_bytes = big * torch.tensor([], dtype=dtype).element_size()
    return {"ranks": size, "dtype": str(dtype).removeprefix("torch."),
            "decode_message_us": round(seconds[0] * 1e6, 1), "decode_message_shape": shapes[0],
            "prefill_message_us": round(seconds[1] * 1e6, 1), "prefill_message_shape": shapes[1],
            "large_message_bytes": big_bytes,
            "bus_bandwidth_GBps": round(2 * (size - 1) / size * big_bytes / seconds[2] / 1e9, 1)}


# ---- 2, 3: the engine ---------------------------------------------------------------------
def make_llm(config: dict, tp: int, args, **options) -> LLM:
    return LLM(str(write_checkpoint_dir(config=config)), load_format="dummy", dtype=args.dtype, device=args.device,
               # No start-up warm-up: each measurement runs untimed first (the best of three
               # decodes; a short offline batch), which compiles what it needs and keeps the
               # three engine starts short.
               tokenizer=args.tokenizer, tensor_parallel_size=tp, warm_up=False,
               enforce_eager=args.enforce_eager, **options)


def release(llm: LLM) -> None:
    llm.close()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def batch1_decode(llm: LLM, new_tokens: int, vocab: int) -> float:
    """Best of three decode rates (tokens after the first, over the decode time)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    (prompt,) = random_prompts(1, 16, vocab)
    best = 0.0
    for _ in range(3):
        (result,) = llm.generate([prompt], params)
        best = max(best, (new_tokens - 1) / result.stats.decode_time)
    return best


def offline(llm: LLM, num_requests: int, input_len: int, output_len: int, vocab: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    prompts = random_prompts(num_requests, input_len, vocab, seed=1)
    # Untimed: 16 prompts fill a step of up to 8192 tokens, as the timed batch does.
    llm.generate(prompts[:16], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    produced = sum(len(r.choices[0].token_ids) for r in llm.generate(prompts, params))
    seconds = time.perf_counter() - start
    assert produced == num_requests * output_len, produced
    return {"seconds": round(seconds, 3), "output_tok_s": round(produced / seconds, 1),
            "total_tok_s": round((produced + num_requests * input_len) / seconds, 1)}


def llama8b_section(args, w: dict) -> dict:
    config = TINY_LLAMA if args.tiny else LLAMA31_8B
    options = dict(max_num_seqs=w["num_requests"], max_num_batched_tokens=w["batched_tokens"],
                   max_model_len=w["input_len"] + w["output_len"] + w["decode_tokens"] + 32,
                   kv_cache_memory=w["kv_cache_memory"], enable_prefix_caching=False)
    rows = {}
    for tp in (1, args.tp):
        llm = make_llm(config, tp, args, **options)
        rows[f"tp{tp}"] = {"batch1_decode_tok_s": round(batch1_decode(llm, w["decode_tokens"], config["vocab_size"]), 1),
                           "offline": offline(llm, w["num_requests"], w["input_len"], w["output_len"],
                                              config["vocab_size"])}
        release(llm)
    one, many = rows["tp1"], rows[f"tp{args.tp}"]
    rows["decode_speedup"] = round(many["batch1_decode_tok_s"] / one["batch1_decode_tok_s"], 3)
    rows["offline_speedup"] = round(many["offline"]["output_tok_s"] / one["offline"]["output_tok_s"], 3)
    return rows


def llama70b_section(args, w: dict, copy_bw: float | None) -> dict:
    config = TINY_BIG if args.tiny else LLAMA31_70B
    llm = make_llm(config, args.tp, args, max_num_seqs=8, max_model_len=w["decode_tokens"] + 64,
                   kv_cache_memory=w["kv_cache_memory"])
    bytes_per_rank = weight_bytes_per_step(llm.core.runner.model)
    tok_s = batch1_decode(llm, w["decode_tokens"], config["vocab_size"])
    release(llm)
    row = {"ranks": args.tp, "batch1_decode_tok_s": round(tok_s, 1), "weight_bytes_per_rank": bytes_per_rank}
    if copy_bw is not None:  # CUDA: every rank reads its weights at the copy bandwidth, at once
        roofline = copy_bw / bytes_per_rank
        row.update(copy_bandwidth_TBps=round(copy_bw / 1e12, 3), roofline_tok_s=round(roofline, 1),
                   fraction_of_roofline=round(tok_s / roofline, 3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="ranks of the split runs")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="toy shapes and workloads (CI, CPU)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the default model's; ids are random anyway)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (if capturing NCCL fails)")
    ap.add_argument("--skip-70b", action="store_true")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/tp_<device>.json)")
    args = ap.parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # for the all-reduce ranks too (the engine sets it for its own)
    cuda = args.device == "cuda"
    args.dtype = "bfloat16" if cuda else "float32"
    w = dict(decode_tokens=128, num_requests=256, input_len=512, output_len=128, batched_tokens=8192,
             kv_cache_memory=None if cuda else 64 << 20)
    if args.tiny:
        w.update(decode_tokens=16, num_requests=8, input_len=64, output_len=16, batched_tokens=512)
    config = TINY_LLAMA if args.tiny else LLAMA31_8B
    label = torch.cuda.get_device_name() if cuda else "cpu"
    results: dict = {"benchmark": "tp", "device": label, "torch": torch.__version__, "workloads": w,
                     "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"],
                     "command": "python benchmarks/tp_bench.py " + " ".join(sys.argv[1:])}
    results["all_reduce"] = all_reduce_section(args.tp, args.device, config["hidden_size"], w["input_len"],
                                               torch.bfloat16 if cuda else torch.float32)
    copy_bw = copy_bandwidth() if cuda else None
    results["llama31_8b"] = llama8b_section(args, w)
    if not args.skip_70b:
        results["llama31_70b"] = llama70b_section(args, w, copy_bw)

    a, e = results["all_reduce"], results["llama31_8b"]
    many, small, big = f"tp{args.tp}", *(("tiny", "tiny-big") if args.tiny else ("8B", "70B"))
    print(f"{'measure':<44}{'TP=1':>12}{f'TP={args.tp}':>12}{'ratio':>10}")
    print(f"{small + ' batch-1 decode tok/s':<44}{e['tp1']['batch1_decode_tok_s']:>12}"
          f"{e[many]['batch1_decode_tok_s']:>12}{e['decode_speedup']:>10}")
    print(f"{small + ' offline output tok/s':<44}{e['tp1']['offline']['output_tok_s']:>12}"
          f"{e[many]['offline']['output_tok_s']:>12}{e['offline_speedup']:>10}")
    if "llama31_70b" in results:
        b = results["llama31_70b"]
        print(f"{f'{big} TP={args.tp} batch-1 decode tok/s / roofline':<44}{'':>12}{b['batch1_decode_tok_s']:>12}"
              f"{b.get('fraction_of_roofline', '-'):>10}")
    print(f"all-reduce x{a['ranks']}: decode message {a['decode_message_us']} us, prefill message "
          f"{a['prefill_message_us']} us, bus bandwidth {a['bus_bandwidth_GBps']} GB/s")
    write_results(results, "tp", label, args.out)


if __name__ == "__main__":
    main()
