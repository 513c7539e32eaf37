"""The serving, offline, prefix-cache and structured-output benchmarks at CI size on CPU, so
they cannot rot: a few requests each, run as their command lines run them; counts and the
JSON's shape, never timings."""
import json
import subprocess
import sys

from conftest import REPO

INPUT_LEN, OUTPUT_LEN, REQUESTS = 16, 8, 4


def bench(script: str, *args: str) -> None:
    subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, check=True, timeout=300)


def assert_ordered(stats: dict) -> None:
    assert stats["p50"] <= stats["p90"] <= stats["p99"], stats


def test_serve_bench_at_a_rate_and_all_at_once(live_server, tmp_path):
    out = tmp_path / "serve.json"
    bench("serve_bench.py", "--base-url", live_server.url, "--request-rates", "20,inf",
          "--num-prompts", str(REQUESTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
          "--label", "ci", "--out", str(out))
    result = json.loads(out.read_text())
    assert [r["load"] for r in result["runs"]] == ["rate 20/s", "all at once"]
    for run in result["runs"]:
        assert (run["completed"], run["failed"], run["errors"]) == (REQUESTS, 0, [])
        assert run["output_tokens"] == REQUESTS * OUTPUT_LEN  # exact, thanks to ignore_eos
        assert run["input_tokens"] == REQUESTS * INPUT_LEN
        for name in ("ttft_ms", "tpot_ms", "itl_ms"):
            assert_ordered(run[name])
        assert run["goodput_req_s"] <= run["request_throughput"]
        assert 0 <= run["slo_attainment"] <= 1
        assert run["engine_step_s"] > 0  # our server's step counter moved
        assert run["gpu_idle_fraction"] is None  # no GPU, no GPU timing
    steady = result["runs"][0]["steady_output_tok_s"]  # the server's token counter mid-arrivals
    assert steady is not None and steady >= 0 and result["runs"][1]["steady_output_tok_s"] is None
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_serve_bench_closed_loop_with_sampled_lengths(live_server, tmp_path):
    out = tmp_path / "serve.json"
    bench("serve_bench.py", "--base-url", live_server.url, "--concurrency", "2",
          "--len-distribution", "uniform", "--num-prompts", str(REQUESTS), "--input-len", str(INPUT_LEN),
          "--output-len", str(OUTPUT_LEN), "--warmup-requests", "0", "--label", "ci", "--out", str(out))
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["load"], run["completed"]) == ("concurrency 2", REQUESTS)
    assert run["output_tokens"] == run["expected_output_tokens"]


def test_offline_bench_twice_with_the_hf_peer(tmp_path):
    out = tmp_path / "offline.json"
    bench("offline_bench.py", "--num-requests", str(REQUESTS), "--input-len", str(INPUT_LEN),
          "--output-len", str(OUTPUT_LEN), "--hf-peer", "--repeat", "2", "--out", str(out))
    result = json.loads(out.read_text())
    first, last = result["wattserve_runs"]
    assert last == result["wattserve"] and first["output_tokens"] == last["output_tokens"] == REQUESTS * OUTPUT_LEN
    assert result["first_vs_last_output_tok_s"] > 0
    assert result["hf_generate_batch"]["output_tokens"] == REQUESTS * OUTPUT_LEN
    assert result["bound"] is None and result["wattserve"]["gpu_idle_fraction_of_step_time"] is None
    assert result["vs_hf"] > 0


def test_prefix_cache_bench_computes_the_shared_prompt_once(tmp_path):
    out = tmp_path / "prefix_cache.json"
    prefix, question = 64, 8  # the prefix is 4 whole blocks of 16
    bench("prefix_cache_bench.py", "--num-requests", str(REQUESTS), "--prefix-len", str(prefix),
          "--question-len", str(question), "--out", str(out))
    result = json.loads(out.read_text())
    plain, cached = result["runs"]["no_cache"], result["runs"]["prefix_cache"]
    assert plain["tokens_processed"] == REQUESTS * (prefix + question)
    assert (plain["prefix_cache_queries"], plain["prefix_cache_hits"]) == (0, 0)
    assert cached["prefix_cache_queries"] == REQUESTS * (prefix + question)
    assert cached["prefix_cache_hits"] == (REQUESTS - 1) * prefix  # every request after the first
    assert cached["tokens_processed"] == prefix + REQUESTS * question
    assert result["ideal_tokens_ratio"] == result["tokens_processed_ratio"] == 3.0
    for run in (plain, cached):
        assert 0 < run["p50_ttft_s"] <= run["p90_ttft_s"] <= run["max_ttft_s"] <= run["prefill_s"]
    assert result["bound"] is None  # no GPU, no matmul rate


def test_structured_bench_constrained_against_free(tmp_path):
    out = tmp_path / "structured.json"
    bench("structured_bench.py", "--num-requests", str(REQUESTS), "--input-len", str(INPUT_LEN),
          "--output-len", str(OUTPUT_LEN), "--repeat", "1", "--out", str(out))
    result = json.loads(out.read_text())
    for name in ("unconstrained", "json_schema"):
        assert result["runs"][name][0]["output_tokens"] == REQUESTS * OUTPUT_LEN
    assert result["json_schema_vs_unconstrained"] > 0 and result["mask_ms_per_step"] > 0
    compile_s = result["compile"]
    assert compile_s["cached_s"] < compile_s["new_schema_s"] <= compile_s["first_ever_s"]


def test_moe_bench_tiny(tmp_path):
    out = tmp_path / "moe.json"
    bench("moe_bench.py", "--tiny", "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["shape"], r["tokens"]) for r in result["layer"]] == \
        [(s, t) for s in ("tiny-8x2", "tiny-16x4") for t in (1, 16)]
    for row in result["layer"]:
        assert row["fused_us"] > 0 and row["reference_us"] > 0 and row["roofline_us"] > 0
        assert 1 <= row["experts_hit"] <= 16
    assert result["decode_batch_1"]["output_tokens"] == 8 and result["decode_batch_1"]["roofline_tok_s"] > 0
    launches = {r["part"]: r for r in result["decode_launches"]}
    # The tiny model's qkv: (4 + 2 * 2) heads of 16 over hidden 64, fp16 on CPU.
    assert launches["qkv_proj [128x64] splits 1 (default)"]["bytes"] == 128 * 64 * 2
    assert [p for p in launches if p.startswith("decode attention splits")] == \
        ["decode attention splits 1 (default)"] + [f"decode attention splits {s} + combine" for s in (2, 4, 8)]
    # The server's 40,960-token table: 2 programs a 132-SM GPU's SM over 2 kv heads, to a power of two.
    assert launches["decode attention, 40960-token table, splits 256"]["programs"] == 512
    assert {"o_proj [64x64] splits 1 (default)", "route (router GEMV + top-k)", "add_rms_norm"} < set(launches)
    assert all(r["us"] > 0 and r["programs"] >= 1 for r in result["decode_launches"])
    assert result["offline"]["output_tok_s"] > 0 and result["offline"]["fraction_of_bound"] > 0


def test_quant_gemv_bench_tiny(tmp_path):
    out = tmp_path / "quant_gemv.json"
    bench("quant_gemv_bench.py", "--tiny", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    formats = [("fp8", "float32"), ("int4_g128", "float32"), ("int4_g128", "bf16x2"), ("q4_0_g32", "float32"),
               ("q4_0_g32", "bf16x2"), ("q8_0", "float32")]  # int4 in both GEMV variants
    assert [(r["matrix"], r["format"], r["variant"]) for r in rows] == \
        [(m, *f) for m in ("square", "wide") for f in formats]
    assert result["copy_bytes_s"] > 0 and all(r["gemv_us"] > 0 and r["tensor_core_us"] > 0 for r in rows)
    assert all(r["x_float32_variant"] > 0 for r in rows if r["variant"] == "bf16x2")


def test_weight_quant_bench_tiny(tmp_path):
    out = tmp_path / "weight_quant.json"
    bench("weight_quant_bench.py", "--tiny", "--tokens", "256", "--window", "128", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["decode_and_prefill"]
    assert list(rows) == ["none", "fp8", "fp8+normfp8", "int4"]
    assert [r["norm_writes_fp8"] for r in rows.values()] == [False, False, True, False]
    assert rows["fp8+normfp8"]["formats"] == rows["fp8"]["formats"]
    assert list(result["perplexity"]) == ["none", "fp8_weights", "fp8", "int4"]
    assert rows["fp8"]["formats"]["qkv_proj"] == "fp8 per-channel"
    assert rows["int4"]["formats"]["down_proj"] == "int4 RTN g128"
    # Quantized linears take less memory; the dense LM head is most of this toy model.
    assert rows["int4"]["weight_bytes_per_decode_step"] < rows["fp8"]["weight_bytes_per_decode_step"] \
        < rows["none"]["weight_bytes_per_decode_step"]
    assert all(r["decode_tok_s"] > 0 and r["roofline_tok_s"] > 0 for r in rows.values())
    quality = result["perplexity"]
    assert quality["none"]["perplexity_increase_pct"] == 0.0 and quality["none"]["mean_kl_nats"] == 0.0
    assert all(r["perplexity"] > 1 for r in quality.values())
    # fp8's weights alone run dense (their fp8 values); W8A8 adds the activations' rounding.
    assert quality["fp8_weights"]["formats"] == quality["none"]["formats"]
    assert 0 < quality["fp8_weights"]["mean_kl_nats"] < quality["fp8"]["mean_kl_nats"]


def test_long_context_bench_tiny(tmp_path):
    out = tmp_path / "long_context.json"
    bench("long_context_bench.py", "--tiny", "--dtypes", "int4", "--contexts", "128,320", "--repeat", "1",
          "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["kv_dtype"], r["context"]) for r in result["runs"]] == \
        [(d, c) for d in ("auto", "int4") for c in (128, 320)]
    for r in result["runs"]:
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["roofline_tok_s"] > 0
        assert r["kv_bytes_per_token"] > 0 and len(r["ttft_s_runs"]) == 1
    # int4 holds the same tokens in fewer bytes than bf16, ring included.
    by = {(r["kv_dtype"], r["context"]): r for r in result["runs"]}
    assert by["int4", 320]["kv_bytes_per_token"] < by["auto", 320]["kv_bytes_per_token"]
    assert by["auto", 320]["ttft_x_bf16"] == 1.0 and result["kernels"] is None  # kernels: CUDA only


def test_tp_bench_at_toy_shapes_with_gloo_ranks(tmp_path, tokenizer):
    tokenizer.hf.save_pretrained(tmp_path)  # the default model's, read back without the GGUF's seconds
    out = tmp_path / "tp.json"
    bench("tp_bench.py", "--device", "cpu", "--tiny", "--tokenizer", str(tmp_path), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["all_reduce"]["ranks"] == 2 and result["all_reduce"]["bus_bandwidth_GBps"] > 0
    rows = result["llama31_8b"]
    for tp in ("tp1", "tp2"):
        assert rows[tp]["batch1_decode_tok_s"] > 0 and rows[tp]["offline"]["output_tok_s"] > 0
    assert result["llama31_70b"]["ranks"] == 2 and "fraction_of_roofline" not in result["llama31_70b"]
