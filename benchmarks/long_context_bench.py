"""Long prompts on every KV cache dtype: TTFT and decode against bf16 and the bytes roofline.

Llama-3.1-8B shapes, random bf16 weights, batch 1, prompts of 8,192 / 32,768 / 130,000 tokens
prefilled in chunks of 8,192 (so every chunk after the first attends over a cached prefix in
the dtype's format), 128 output tokens, one engine per KV dtype (auto is bf16, the peer):
  1. TTFT: arrival to first token, against bf16's at the same context.
  2. decode tok/s (1 / TPOT of the same request), against its roofline: the copy bandwidth
     measured in this run over the bytes one decode token must read, the weights (as
     _roofline.weight_bytes_per_step counts them) plus the sequence's KV at its prompt length
     (its blocks and, int4/int2, its ring, as the engine sizes them).
  3. (CUDA) kv_quant_kernel_bench's decode attention at 32 x 8k and its KV write of a
     4096-token prefill, and kv_prefill_bench's prefill attention of the 130k prompt's last
     chunk (8,192 queries over the context, one layer; in registers and through the bf16
     scratch), per dtype against bf16 (each checked against its reference first).

Runs and warm-up: each engine first runs a prompt of 1.5 chunks (untimed: it compiles the
prefill kernel without and with a cached prefix, at the chunk's tile, and the decode path);
contexts up to 32k then run `--repeat` times (default 2) and report the last; longer ones run
once, since with the kernels compiled a run is warm and a quantized 130k prefill took 47 s
before issue 23's work. Every run's TTFT stays in the JSON. Budget on an H200: about 4.5
minutes with quantized prefills near bf16's (per quantized dtype ~45 s: engine ~15 s, 130k
prompt ~16 s; bf16 ~35 s; kernels ~70 s), about 7.5 at the pre-issue-23 speeds (a 130k
prefill ~47 s); `--dtypes` and `--contexts` split it into shorter runs (their JSON files: --out).

--tiny runs it all on CPU (a 2-layer toy Llama, contexts 128 / 320 / 700 in chunks of 128, 8
output tokens); the kernel microbenchmarks need CUDA graphs and are left out there.

Usage: python benchmarks/long_context_bench.py [--tokenizer DIR] [--dtypes auto,int4]
       [--contexts 8192,32768,130000] [--tiny]
Writes benchmarks/results/long_context_<device>.json.
"""
from __future__ import annotations

import argparse
import gc

import torch
from _results import write_results
from _roofline import copy_bandwidth, weight_bytes_per_step
from llama8b_config import LLAMA31_8B, TINY_LLAMA, write_checkpoint_dir

from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.kernels.kv_format import KV_CACHE_DTYPES, kv_format

FULL = {"contexts": (8192, 32768, 130000), "chunk": 8192, "new_tokens": 128, "kv_memory": 18 << 30}
TINY = {"contexts": (128, 320, 700), "chunk": 128, "new_tokens": 8, "kv_memory": 64 << 20}
REPEATED_UP_TO = 32768  # contexts above this run once (see the docstring)
GOALS = {"ttft_x_bf16_at_130k": 1.2, "decode_x_roofline_at_130k": 0.85,  # issue 23
         "decode_attention_x_bf16": {"int4": 2.5, "fp8_e4m3": 1.6, "int8": 1.6}}


def make_llm(kv_dtype: str, checkpoint, shapes: dict, device: torch.device, tokenizer: str | None) -> LLM:
    return LLM(str(checkpoint), load_format="dummy", device=device.type, tokenizer=tokenizer,
               dtype="bfloat16" if device.type == "cuda" else "auto", kv_cache_dtype=kv_dtype,
               kv_cache_memory=shapes["kv_memory"], max_num_seqs=1, max_num_batched_tokens=shapes["chunk"],
               max_model_len=max(shapes["contexts"]) + shapes["new_tokens"],
               # No prefix caching: every run prefills its whole prompt. The warm-up below
               # compiles exactly the shapes measured.
               enable_prefix_caching=False, warm_up=False)


def kv_bytes_read(llm: LLM, context: int) -> int:
    """KV bytes one decode token reads at `context`: the sequence's blocks and its ring. For
    int4/int2 the blocks still in the ring are counted twice, <= 2 of >= 128 blocks here."""
    runner, bs = llm.core.runner, llm.core.config.cache.block_size
    return -(-context // bs) * runner.bytes_per_block(bs) + runner.bytes_per_ring(bs)


def run_dtype(kv_dtype: str, checkpoint, shapes: dict, device, args, copy: float, vocab: int) -> list[dict]:
    llm = make_llm(kv_dtype, checkpoint, shapes, device, args.tokenizer)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=shapes["new_tokens"], ignore_eos=True)
    warm = torch.randint(0, vocab, (min(shapes["chunk"] * 3 // 2, max(shapes["contexts"])),), generator=gen).tolist()
    llm.generate([warm], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    weights = weight_bytes_per_step(llm.core.runner.model)
    rows = []
    for context in shapes["contexts"]:
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        runs = [llm.generate([prompt], params)[0].stats
                for _ in range(args.repeat if context <= REPEATED_UP_TO else 1)]
        last = runs[-1]
        step_bytes = weights + kv_bytes_read(llm, context)
        rows.append({"kv_dtype": kv_dtype, "context": context, "ttft_s": last.ttft,
                     "ttft_s_runs": [r.ttft for r in runs], "decode_tok_s": 1 / last.tpot,
                     "decode_tok_s_runs": [1 / r.tpot for r in runs], "weight_bytes_per_token": weights,
                     "kv_bytes_per_token": step_bytes - weights, "roofline_tok_s": copy / step_bytes})
        rows[-1]["decode_x_roofline"] = rows[-1]["decode_tok_s"] / rows[-1]["roofline_tok_s"]
        print(f"{kv_dtype} {context}: TTFT {last.ttft:.3f} s, {rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def kernel_section(dtypes: list[str], chunk: int, context: int) -> dict:
    """kv_quant_kernel_bench's decode attention (32 x 8k) and prefill KV write, and
    kv_prefill_bench's chunk over the long context, per dtype."""
    from kernel_bench import warm_up_gpu
    from kv_prefill_bench import dtype_case
    from kv_quant_kernel_bench import decode_case, write_case

    warm_up_gpu()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {"decode": [], "write": [], "prefill_chunk": [], "chunk": chunk, "context": context}
    for name in dtypes:
        out["decode"].append(decode_case(name, gen, {}, sweep=False))
        out["write"].append(write_case(name, gen))
        out["prefill_chunk"].append(dtype_case(name, chunk, context, gen))
        torch.cuda.empty_cache()
    base_d, base_w = out["decode"][0]["default"]["ms"], out["write"][0]["ms"]
    base_p = out["prefill_chunk"][0]["registers"]["ms"]
    for d, w, p in zip(out["decode"], out["write"], out["prefill_chunk"]):
        d["speedup_vs_bf16"] = base_d / d["default"]["ms"]
        w["time_x_bf16"] = w["ms"] / base_w
        p["time_x_bf16"] = min(p["registers"]["ms"], p.get("scratch", p["registers"])["ms"]) / base_p
    return out


def print_tables(results: dict) -> None:
    print(f"\n{results['device']}: copy {results['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write); "
          f"batch 1, chunks of {results['chunk']}, {results['new_tokens']} output tokens")
    print(f"{'context':>8} {'kv dtype':9} {'TTFT s':>8} {'x bf16':>7} {'tok/s':>7} {'roofline':>9} {'x roof':>7}")
    bf16 = {r["context"]: r for r in results["runs"] if r["kv_dtype"] == "auto"}
    for r in sorted(results["runs"], key=lambda r: r["context"]):
        ratio = r["ttft_s"] / bf16[r["context"]]["ttft_s"] if r["context"] in bf16 else float("nan")
        print(f"{r['context']:8d} {r['kv_dtype']:9} {r['ttft_s']:8.3f} {ratio:6.2f}x {r['decode_tok_s']:7.1f} "
              f"{r['roofline_tok_s']:9.1f} {r['decode_x_roofline']:7.2f}")
    kernels = results.get("kernels")
    if kernels:
        print(f"\n{'kv dtype':9} {'decode 32x8k ms':>16} {'speedup':>8} | {'write 4096 ms':>14} {'x bf16':>7} | "
              f"{'chunk registers ms':>18} {'scratch ms':>11} {'best x bf16':>12}")
        for d, w, p in zip(kernels["decode"], kernels["write"], kernels["prefill_chunk"]):
            scratch = f"{p['scratch']['ms']:11.2f}" if "scratch" in p else " " * 11
            print(f"{d['dtype']:9} {d['default']['ms']:16.4f} {d['speedup_vs_bf16']:7.2f}x | {w['ms']:14.4f} "
                  f"{w['time_x_bf16']:6.2f}x | {p['registers']['ms']:18.2f} {scratch} {p['time_x_bf16']:11.2f}x")
        print(f"chunk: {kernels['chunk']} queries at the end of a {kernels['context']}-token context, one layer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy shapes, on CPU unless --device says otherwise")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu with --tiny, else cuda)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the default model's)")
    ap.add_argument("--dtypes", default=",".join(KV_CACHE_DTYPES), help="comma-separated; auto (bf16) always runs")
    ap.add_argument("--contexts", help="comma-separated prompt lengths (default 8192,32768,130000)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per context up to 32k; the last is reported")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/long_context_<device>.json)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtypes = ["auto"] + [n for n in args.dtypes.split(",") if n != "auto"]
    for n in dtypes:
        kv_format(n)  # rejects unknown names before any work
    shapes = dict(TINY if args.tiny else FULL)
    if args.contexts:
        shapes["contexts"] = tuple(int(c) for c in args.contexts.split(","))
    config = TINY_LLAMA if args.tiny else LLAMA31_8B
    checkpoint = write_checkpoint_dir(config=config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    copy = copy_bandwidth(device)
    results = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "copy_bytes_per_s": copy,
               "model": "tiny Llama" if args.tiny else "Llama-3.1-8B shapes, random bf16 weights",
               **shapes, "repeat_up_to_context": REPEATED_UP_TO, "repeat": args.repeat, "goals": GOALS, "runs": []}
    for kv_dtype in dtypes:
        results["runs"] += run_dtype(kv_dtype, checkpoint, shapes, device, args, copy, config["vocab_size"])
    bf16 = {r["context"]: r for r in results["runs"] if r["kv_dtype"] == "auto"}
    for r in results["runs"]:
        r["ttft_x_bf16"] = r["ttft_s"] / bf16[r["context"]]["ttft_s"]
        r["decode_x_bf16"] = r["decode_tok_s"] / bf16[r["context"]]["decode_tok_s"]
    # The engine results are written before the kernels run, so that they survive a failure there.
    write_results(results, "long_context", name, args.out)
    results["kernels"] = (kernel_section(dtypes, shapes["chunk"], max(shapes["contexts"]))
                          if device.type == "cuda" else None)
    print_tables(results)
    write_results(results, "long_context", name, args.out)


if __name__ == "__main__":
    main()
