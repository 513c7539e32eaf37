"""Structured output's cost: a batch of N json_schema requests against the same batch
unconstrained, in one process, and grammar compile time for a new schema against a cached one.

Every request produces exactly O tokens: the schema (an array of at least 1,000 small objects)
cannot be finished sooner, and unconstrained requests ignore EOS. Constrained sequences do not
launch ahead (engine/sampler.py `reads_own_tokens`: the next mask needs the last token), and
each step fills their masks on the host (engine/structured/bitmask.py); the ratio of output
throughputs is what both cost together. The two batches alternate (--repeat runs each) so
that drift of the machine falls on both.

On CUDA, Llama-3.1-8B shapes with random weights in bf16 (logits 128,256 wide; the tokenizer is
the default model's unless --tokenizer names a Llama 3 one, which makes masks costlier to fill:
use it where there is one). On CPU, the default model in float32.

Usage: python benchmarks/structured_bench.py [--num-requests 64] [--input-len 128]
       [--output-len 128] [--repeat 2] [--tokenizer DIR]
Writes benchmarks/results/structured_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from llama8b_config import write_checkpoint_dir
from _results import write_results

import wattserve.engine.sampler as sampler_module
from wattserve.engine.llm import LLM
from wattserve.engine.request import SamplingParams
from wattserve.engine.structured.spec import OutputConstraint

ITEMS = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 99999},
    "name": {"type": "string", "maxLength": 8},
    "ok": {"type": "boolean"}}, "required": ["id", "name", "ok"], "additionalProperties": False}


def schema(variant: int) -> OutputConstraint:
    """A long array of ITEMS; `variant` makes a schema no cache has seen."""
    return OutputConstraint("json_schema", json.dumps(
        {"type": "array", "items": ITEMS, "minItems": 1000 + variant}))


class MaskTimer:
    """Host time of each step's mask_logits (filling on the host, the device op launched)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._inner = sampler_module.mask_logits

    def __call__(self, logits, seqs):
        start = time.perf_counter()
        out = self._inner(logits, seqs)
        if any(s.grammar is not None for s in seqs):
            self.seconds.append(time.perf_counter() - start)
        return out


def run(llm: LLM, prompts: list[list[int]], output_len: int, constraint: OutputConstraint | None) -> dict:
    # Greedy, as offline_bench: with random weights (CUDA) a draw could pick ids past the tokenizer.
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=constraint is None,
                            structured=constraint)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    produced = sum(len(r.choices[0].token_ids) for r in results)
    if produced != len(prompts) * output_len:
        raise SystemExit(f"produced {produced} tokens, not {len(prompts) * output_len}: unfair comparison")
    if constraint is not None:  # the grammar's doing: every output is a prefix of the array
        assert all(r.choices[0].text.startswith("[{\"id\": ") for r in results), results[0].choices[0].text
    return {"seconds": round(seconds, 3), "output_tokens": produced, "output_tok_s": round(produced / seconds, 1)}


def compile_times(llm: LLM) -> dict:
    grammars = llm.core.grammars
    start = time.perf_counter()
    grammars.compile(schema(-1)).result()  # builds the tokenizer's token table first
    first = time.perf_counter() - start
    start = time.perf_counter()
    grammars.compile(schema(-2)).result()
    new = time.perf_counter() - start
    start = time.perf_counter()
    grammars.compile(schema(-2)).result()
    cached = time.perf_counter() - start
    return {"first_ever_s": round(first, 4), "new_schema_s": round(new, 4), "cached_s": round(cached, 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tokenizer", help="CUDA: tokenizer dir for the random-weight model")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/structured_<device>.json)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = dict(max_num_seqs=max(args.num_requests, 8), max_model_len=args.input_len + args.output_len + 8)
    if device.type == "cuda":
        llm = LLM(str(write_checkpoint_dir()), load_format="dummy", dtype="bfloat16", device="cuda",
                  tokenizer=args.tokenizer, **options)
    else:
        llm = LLM(device="cpu", kv_cache_memory=256 << 20, **options)
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    compile_s = compile_times(llm)
    gen = torch.Generator().manual_seed(0)
    vocab = llm.core.tokenizer.vocab_size
    timer = MaskTimer()
    sampler_module.mask_logits = timer
    runs: dict[str, list[dict]] = {"unconstrained": [], "json_schema": []}
    for i in range(args.repeat):  # fresh prompts each run: the prefix cache must serve none
        for name in runs:
            prompts = torch.randint(0, vocab, (args.num_requests, args.input_len), generator=gen).tolist()
            runs[name].append(run(llm, prompts, args.output_len, schema(i) if name == "json_schema" else None))
    free, constrained = runs["unconstrained"][-1], runs["json_schema"][-1]
    ratio = round(constrained["output_tok_s"] / free["output_tok_s"], 3)
    mask_ms = 1e3 * sum(timer.seconds) / max(1, len(timer.seconds))
    results = {
        "benchmark": "structured", "device": label, "model": llm.core.model_name,
        "dtype": str(llm.core.dtype).removeprefix("torch."), "logits_width": llm.core.model_config.vocab_size,
        "tokenizer_vocab": vocab, "launch_ahead": llm.core.launch_ahead,
        "command": "python " + " ".join(sys.argv), "num_requests": args.num_requests,
        "input_len": args.input_len, "output_len": args.output_len, "runs": runs,
        "json_schema_vs_unconstrained": ratio, "mask_ms_per_step": round(mask_ms, 3),
        "compile": compile_s,
    }
    print(f"{args.num_requests} requests x {args.input_len} prompt tokens -> {args.output_len} output tokens, "
          f"{results['model']} ({results['dtype']}) on {label}")
    print(f"{'batch (last run)':<24}{'output tok/s':>14}{'seconds':>10}")
    for name, r in (("unconstrained", free), ("json_schema", constrained)):
        print(f"{name:<24}{r['output_tok_s']:>14.1f}{r['seconds']:>10.2f}")
    print(f"json_schema / unconstrained: {ratio:.3f}x; masks {mask_ms:.2f} ms per step on the host")
    print(f"compile: first ever {compile_s['first_ever_s']:.3f} s (with the token table), new schema "
          f"{compile_s['new_schema_s']:.3f} s, cached {compile_s['cached_s'] * 1e6:.0f} us")
    write_results(results, "structured", label, args.out)


if __name__ == "__main__":
    main()
