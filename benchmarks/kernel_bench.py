"""The Triton kernels on a CUDA GPU against the limits measured in the same run.

(a) device-to-device copy bandwidth (bytes read + written), the ceiling for memory-bound ops;
(b) decode attention, Llama-3.1-8B shapes (32 q heads, 8 kv heads, head_dim 128, bf16, block
    16, blocks scattered), batch 64 x 4k and batch 1 x 32k: KV bytes read / time vs (a);
(c) prefill attention, one 4096-token prompt: causal TFLOP/s vs a bf16 matmul of the same
    FLOPs and torch's flash scaled_dot_product_attention, and the engine's choice for a fresh
    prompt (cuDNN on sm_90+, kernels/cudnn_prefill.py);
(d) rms_norm, add_rms_norm, rotary, silu_and_mul, write_kv: bytes / time vs (a);
(e) a mixed batch (63 decodes + a 512-token chunk, 4k contexts), as the entry point runs it
    (all in the prefill kernel) and split across the two kernels: KV bytes / time vs (a).
Every kernel is first checked against its reference on the GPU (||out - ref|| / ||ref||).
Memory-bound kernels: a CUDA graph of calls back to back, each on its own buffers (several
times the L2 in all, as a model's layers are), median of replays per call. Timed as lone
calls (do_bench), batch 1 x 32k decode took 0.11-0.14 ms, two to three times the graph's
figure in results/kernels_*.json: the host's launch time and the write-back of the L2 flush's
dirty lines fall inside a short kernel's timed region. The copy, prefill (compute-bound) and its peers: do_bench medians.

Usage: python benchmarks/kernel_bench.py [--sweep]   (--sweep: a bounded grid of decode and
prefill tunables, about a minute more). Writes benchmarks/results/kernels_<gpu>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from wattserve.kernels.activation import silu_and_mul_ref
from wattserve.kernels.attention import AttentionMetadata, paged_attention_ref
from wattserve.kernels.cudnn_prefill import fresh_prefill_fits
from wattserve.kernels.kv_format import FORMATS, LayerKVCache
from wattserve.kernels.kv_write import write_kv_ref
from wattserve.kernels.norm import add_rms_norm_ref, rms_norm_ref
from wattserve.kernels.rotary import apply_rotary_ref, rope_cos_sin
from wattserve.kernels.triton_activation import silu_and_mul_triton
from wattserve.kernels.triton_attention import paged_attention_triton
from wattserve.kernels.triton_attention_decode import default_num_splits, paged_decode_attention, paged_decode_attention_ref
from wattserve.kernels.triton_attention_prefill import paged_prefill_attention
from wattserve.kernels.triton_kv_write import write_kv_unquantized
from wattserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from wattserve.kernels.triton_rotary import apply_rotary_triton

HEADS, KV_HEADS, HEAD_DIM, BLOCK, HIDDEN, INTER = 32, 8, 128, 16, 4096, 14336  # Llama-3.1-8B
DTYPE = torch.bfloat16
AUTO = FORMATS["auto"]
REL_ERR_BOUND = 1e-2  # bf16 operands, float32 accumulation
DEV = "cuda"


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def per_call_ms(fns, reps: int = 30) -> float:
    """Median time per call of `fns`, replayed back to back from one CUDA graph."""
    for fn in fns:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    # Replays until warm: the first ~30 replays of a fresh graph over new buffers ran 18%
    # slower on an H100 here (cause not established); later ones agree within 1%.
    start = time.perf_counter()
    while time.perf_counter() - start < 0.2:
        graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    """Buffer sets to rotate through so that one pass moves at least 2 GB (40x the L2)."""
    return max(2, math.ceil(2e9 / nbytes))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(name: str, out, ref) -> float:
    err = rel_err(out, ref)
    if err > REL_ERR_BOUND:
        raise SystemExit(f"{name}: relative error {err:.2e} over {REL_ERR_BOUND:.0e}; not timing a wrong kernel")
    return err


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Busy the GPU until its clocks leave idle: the first timings of a cold H100 here came
    out 15% slow."""
    x = torch.randn(2**28, device=DEV)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        x.mul_(1.0)
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written.
    Eager, not from a graph: captured, the copy becomes a memcpy node that ran at 2.4 TB/s
    on an H100 against 3.0 eager (the L2 flush is 1% of 4 GiB moved)."""
    src = torch.randn(2**30, dtype=DTYPE, device=DEV)
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    nbytes = src.numel() * src.element_size()
    del src, dst
    return 2 * nbytes / (t * 1e-3)


def paged_cache(context_lens: list[int], gen: torch.Generator):
    """Random bf16 caches with each sequence's blocks at random places in the pool."""
    blocks = [-(-c // BLOCK) for c in context_lens]
    num_blocks = sum(blocks) + 1
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEV, generator=gen)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEV, generator=gen)
    perm = torch.randperm(num_blocks, device=DEV, generator=gen)
    tables = torch.zeros(len(context_lens), max(blocks), dtype=torch.int32, device=DEV)
    start = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = perm[start : start + nb]
        start += nb
    return k_cache, v_cache, tables


def decode_case(batch: int, ctx: int, gen, sweep: bool) -> dict:
    lens = [ctx] * batch
    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    layers = [paged_cache(lens, gen) for _ in range(copies_for(kv_bytes))]  # (k, v, tables)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = HEAD_DIM**-0.5
    k_cache, v_cache, tables = layers[0]
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    ref = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, context_lens, scale)
    err = check(f"decode {batch}x{ctx}", out, ref)
    del ref

    def run(**tunables):
        t = per_call_ms([
            lambda k=k, v=v, tb=tb: paged_decode_attention(q, k, v, tb, context_lens, scale, **tunables)
            for k, v, tb in layers
        ])
        return {"ms": t, "kv_bytes_per_s": kv_bytes / (t * 1e-3), **tunables}

    # The default timed twice: the spread between the two is the noise to judge a sweep by.
    result = {"batch": batch, "context": ctx, "rel_err": err, "kv_bytes": kv_bytes, "layers": len(layers),
              "default": run(), "default_again": run()}
    if sweep:
        configs = []
        for tile, warps, stages, factor in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (0.5, 1, 2)):
            max_tiles = triton.cdiv(tables.shape[1] * BLOCK, tile)
            splits = max(1, int(default_num_splits(batch, KV_HEADS, max_tiles, q.device) * factor))
            configs.append(run(tile_tokens=tile, num_warps=warps, num_stages=stages, num_splits=splits))
        result["sweep"] = sorted(configs, key=lambda c: c["ms"])
    del layers
    return result


def attention_meta(query_lens: list[int], context_lens: list[int], tables: torch.Tensor) -> AttentionMetadata:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=DEV), block_tables=tables,
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEV),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEV),
        query_lens=query_lens, context_lens_host=context_lens,
    )


def mixed_case(gen) -> dict:
    """Chunked prefill beside decodes: 63 decodes at 4k context and a 512-token chunk over a
    3584-token prefix. The entry point sends the whole batch to the prefill kernel; 'split'
    runs the decode rows through the decode kernel and the chunk through the prefill kernel,
    to show what splitting mixed batches would gain."""
    decodes, chunk, ctx = 63, 512, 4096
    query_lens, lens = [1] * decodes + [chunk], [ctx] * (decodes + 1)
    kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    layers = [paged_cache(lens, gen) for _ in range(copies_for(kv_bytes))]
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, dtype=DTYPE, device=DEV, generator=gen)
    scale = HEAD_DIM**-0.5
    k_cache, v_cache, tables = layers[0]
    meta = attention_meta(query_lens, lens, tables)
    out = paged_prefill_attention(q, k_cache, v_cache, meta, scale)
    err = check("mixed batch", out, paged_attention_ref(q.float(), LayerKVCache(AUTO, k_cache.float(), v_cache.float()), meta, scale))
    whole = [(k, v, attention_meta(query_lens, lens, tb)) for k, v, tb in layers]
    dec_lens = meta.context_lens[:decodes]
    parts = [(k, v, tb[:decodes], attention_meta([chunk], [ctx], tb[decodes:])) for k, v, tb in layers]

    def split(k, v, dec_tables, chunk_meta):
        paged_decode_attention(q[:decodes], k, v, dec_tables, dec_lens, scale)
        paged_prefill_attention(q[decodes:], k, v, chunk_meta, scale)

    t_whole = per_call_ms([lambda a=a: paged_prefill_attention(q, *a, scale) for a in whole])
    t_split = per_call_ms([lambda a=a: split(*a) for a in parts])
    return {"decodes": decodes, "chunk": chunk, "context": ctx, "rel_err": err, "kv_bytes": kv_bytes,
            "whole_ms": t_whole, "split_ms": t_split}


def prefill_case(length: int, gen, sweep: bool) -> dict:
    k_cache, v_cache, tables = paged_cache([length], gen)
    q = torch.randn(length, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV, generator=gen)
    meta = attention_meta([length], [length], tables)
    scale = HEAD_DIM**-0.5
    out = paged_prefill_attention(q, k_cache, v_cache, meta, scale)
    err = check(f"prefill {length}", out, paged_attention_ref(q.float(), LayerKVCache(AUTO, k_cache.float(), v_cache.float()), meta, scale))
    flops = 2 * 2 * HEADS * HEAD_DIM * length * (length + 1) / 2

    def run(**tunables):
        t = ms(lambda: paged_prefill_attention(q, k_cache, v_cache, meta, scale, **tunables))
        return {"ms": t, "tflops": flops / (t * 1e-3) / 1e12, **tunables}

    # Peers over the same tokens: flash SDPA on contiguous K/V (heads expanded for GQA), and a
    # bf16 matmul with the same FLOP count (M = N = 4096, K chosen to match).
    n_tok = length // BLOCK * BLOCK
    idx = tables[0, : n_tok // BLOCK]
    k = k_cache[idx].reshape(1, n_tok, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
    v = v_cache[idx].reshape(1, n_tok, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
    qs = q[:n_tok].transpose(0, 1).unsqueeze(0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t_sdpa = ms(lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale))
    # What the engine runs for a fresh prompt on sm_90+ (kernels/cudnn_prefill.py).
    cache = LayerKVCache(AUTO, k_cache, v_cache)
    t_cudnn = ms(lambda: paged_attention_triton(q, cache, meta, scale))
    m = 4096
    kdim = max(64, round(flops / (2 * m * m) / 64) * 64)
    a = torch.randn(m, kdim, dtype=DTYPE, device=DEV, generator=gen)
    b = torch.randn(kdim, m, dtype=DTYPE, device=DEV, generator=gen)
    t_mm = ms(lambda: a @ b)
    result = {
        "length": length, "rel_err": err, "flops": flops, "default": run(), "default_again": run(),
        "sdpa_flash": {"ms": t_sdpa, "tflops": flops / (t_sdpa * 1e-3) / 1e12},
        "engine_path": {"ms": t_cudnn, "tflops": flops / (t_cudnn * 1e-3) / 1e12,
                        "cudnn": fresh_prefill_fits(q, cache, meta, None, None)},
        "matmul": {"shape": [m, kdim, m], "ms": t_mm, "tflops": 2 * m * m * kdim / (t_mm * 1e-3) / 1e12},
    }
    if sweep:
        configs = [run(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                   for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
        result["sweep"] = sorted(configs, key=lambda c: c["ms"])
    return result


def elementwise_cases(gen) -> dict:
    """Memory-bound ops over 8192 tokens of Llama-3.1-8B: bytes read + written / time."""
    n = 8192
    r = lambda *s: torch.randn(*s, dtype=DTYPE, device=DEV, generator=gen)  # noqa: E731
    positions = torch.randint(0, 8192, (n,), device=DEV, generator=gen)
    table = rope_cos_sin(HEAD_DIM, 500000.0, None, 8192).to(DEV)
    w = r(HIDDEN)
    num_slots = (n // BLOCK + 8) * BLOCK

    def qkv_views():
        qkv = r(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        q = qkv[:, : HEADS * HEAD_DIM].view(n, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(n, KV_HEADS, HEAD_DIM)
        v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(n, KV_HEADS, HEAD_DIM)
        return q, k, v

    def kv_write_inputs():
        _, k, v = qkv_views()
        cache = r(2, num_slots // BLOCK, BLOCK, KV_HEADS, HEAD_DIM)
        return k, v, cache, torch.randperm(num_slots, device=DEV, generator=gen)[:n]

    def write_kv_both(k, v, cache, slots):
        want = cache.clone()
        write_kv_ref(k, v, LayerKVCache(AUTO, want[0], want[1]), SimpleNamespace(slot_mapping=slots))
        write_kv_unquantized(k, v, cache[0], cache[1], slots)
        return (cache,), (want,)

    e = DTYPE.itemsize
    # name: (make one buffer set, the kernel on it, (kernel outputs, reference outputs) on a
    # fresh set, bytes read + written)
    cases = {
        "rms_norm": (lambda: (r(n, HIDDEN),), lambda x: rms_norm_triton(x, w, 1e-5),
                     lambda x: ((rms_norm_triton(x, w, 1e-5),), (rms_norm_ref(x, w, 1e-5),)),
                     2 * n * HIDDEN * e),
        "add_rms_norm": (lambda: (r(n, HIDDEN), r(n, HIDDEN)), lambda x, res: add_rms_norm_triton(x, res, w, 1e-5),
                         lambda x, res: (add_rms_norm_triton(x.clone(), res.clone(), w, 1e-5),
                                         add_rms_norm_ref(x, res, w, 1e-5)),
                         4 * n * HIDDEN * e),
        "rotary": (lambda: qkv_views()[:2], lambda q, k: apply_rotary_triton(q, k, positions, table),
                   lambda q, k: (apply_rotary_ref(q, k, positions, table),
                                 apply_rotary_triton(q, k, positions, table))[::-1],
                   2 * n * (HEADS + KV_HEADS) * HEAD_DIM * e),
        "silu_and_mul": (lambda: (r(n, 2 * INTER),), silu_and_mul_triton,
                         lambda gu: ((silu_and_mul_triton(gu),), (silu_and_mul_ref(gu),)),
                         3 * n * INTER * e),
        "write_kv": (kv_write_inputs, lambda k, v, cache, slots: write_kv_unquantized(k, v, cache[0], cache[1], slots),
                     write_kv_both, 4 * n * KV_HEADS * HEAD_DIM * e),
    }
    out = {}
    for name, (make, kernel, compare, nbytes) in cases.items():
        got, want = compare(*make())
        err = max(map(rel_err, got, want))
        if err > REL_ERR_BOUND:
            raise SystemExit(f"{name}: relative error {err:.2e}")
        sets = [make() for _ in range(copies_for(nbytes))]
        t = per_call_ms([lambda a=a: kernel(*a) for a in sets])
        del sets
        out[name] = {"ms": t, "bytes": nbytes, "bytes_per_s": nbytes / (t * 1e-3), "rel_err": err}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time a bounded grid of attention tunables")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    name = torch.cuda.get_device_name()

    warm_up_gpu()
    copy = copy_bandwidth()
    results = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
               "copy_bytes_per_s": copy}
    results["decode"] = [decode_case(64, 4096, gen, args.sweep), decode_case(1, 32768, gen, args.sweep)]
    results["prefill"] = prefill_case(4096, gen, args.sweep)
    results["mixed"] = mixed_case(gen)
    results["elementwise"] = elementwise_cases(gen)

    print(f"\n{name}: copy {copy / 1e12:.2f} TB/s (read + write)")
    print(f"{'kernel':34} {'ms':>8} {'rate':>14} {'vs peer':>9}")
    for d in results["decode"]:
        r = d["default"]
        print(f"{'decode ' + str(d['batch']) + ' x ' + str(d['context']):34} {r['ms']:8.3f} "
              f"{r['kv_bytes_per_s'] / 1e12:10.2f} TB/s {r['kv_bytes_per_s'] / copy:8.0%}")
    p = results["prefill"]
    for label, r in (("prefill 4096 (triton)", p["default"]), ("prefill 4096 (sdpa flash)", p["sdpa_flash"]),
                     ("prefill 4096 (engine: cudnn)" if p["engine_path"]["cudnn"] else "prefill 4096 (engine)",
                      p["engine_path"]),
                     ("matmul " + "x".join(map(str, p["matmul"]["shape"])), p["matmul"])):
        print(f"{label:34} {r['ms']:8.3f} {r['tflops']:8.0f} TFLOP/s {r['tflops'] / p['matmul']['tflops']:8.0%}")
    mx = results["mixed"]
    for how in ("whole", "split"):
        t = mx[f"{how}_ms"]
        label = f"mixed {mx['decodes']} dec + {mx['chunk']} chunk ({how})"
        print(f"{label:34} {t:8.3f} {mx['kv_bytes'] / (t * 1e-3) / 1e12:10.2f} TB/s {mx['kv_bytes'] / (t * 1e-3) / copy:8.0%}")
    for op, r in results["elementwise"].items():
        print(f"{op:34} {r['ms']:8.3f} {r['bytes_per_s'] / 1e12:10.2f} TB/s {r['bytes_per_s'] / copy:8.0%}")
    if args.sweep:
        for d in results["decode"]:
            print(f"decode {d['batch']}x{d['context']} best:", d["sweep"][:3])
        print("prefill best:", p["sweep"][:3])

    path = Path(__file__).parent / "results" / f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
