"""`wattserve serve [MODEL] ...`: load a model and serve the OpenAI API over HTTP.

Flag defaults come from the config dataclasses, so the dataclasses stay the one place where a
default is decided; a preset file (--config, server/config_file.py) overrides them with
set_defaults, and flags on the command line override the file.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import uvicorn

from wattserve.engine.client import EngineInfo
from wattserve.engine.config import CacheConfig, EngineConfig, MonitorConfig, SchedulerConfig
from wattserve.engine.weight_loading import QUANTIZATIONS
from wattserve.kernels.kv_format import KV_CACHE_DTYPES
from wattserve.server.config_file import PresetError, load_preset
from wattserve.server.state import ServerConfig
from wattserve.server.tool_parsers import PARSERS

log = logging.getLogger("wattserve.server")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "1048576", "64MiB", "1.5GiB" or "500MB"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB, 2GiB or bytes)")
    return int(float(match.group(1)) * unit)


def build_parser(preset: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wattserve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Load MODEL and serve /v1/chat/completions, /v1/completions and "
                    "/v1/models, plus /health, /ready, /metrics and /version.")
    add_serve_arguments(serve)
    serve.add_argument("--config", metavar="FILE",
                       help="YAML preset of these options, keyed by flag name (e.g. "
                            "max-num-seqs: 8; see configs/); flags given here override it")
    serve.set_defaults(**(preset or {}))
    top = commands.add_parser("top", help="a live terminal view of a server's /metrics",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    top.add_argument("--url", default="http://127.0.0.1:8000", help="the server to watch")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_engine_args(parser)
    _add_server_args(parser)
    _add_monitoring_args(parser)


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    engine, cache, sched = EngineConfig(), CacheConfig(), SchedulerConfig()
    parser.add_argument("model", nargs="?", default=engine.model,
                        help="a Hugging Face model directory or id, or a .gguf file; "
                             "omitted: the bundled SmolLM2-135M-Instruct (Q4_1 GGUF)")
    group = parser.add_argument_group("model")
    group.add_argument("--load-format", default=engine.load_format,
                       choices=["auto", "gguf", "safetensors", "dummy"],
                       help="how to read the weights; auto picks by the files found, dummy "
                            "makes random weights of the checkpoint's shapes")
    group.add_argument("--dtype", default=engine.dtype,
                       choices=["auto", "float32", "float16", "bfloat16"],
                       help="dtype of weights and activations; auto: float32 on CPU, the "
                            "checkpoint's (or bfloat16) on CUDA")
    group.add_argument("--quantization", default=engine.quantization, choices=QUANTIZATIONS,
                       help="format the linear layers run in. auto: the checkpoint's (GGUF blocks, "
                            "AWQ, GPTQ, FP8 kept quantized on CUDA; dequantized at load on CPU, "
                            "where that is faster); checkpoint: the checkpoint's on every device; "
                            "none: dequantized; fp8: float8 weights and activations (W8A8), "
                            "quantized at load; int4: weight-only int4, group 128, round to "
                            "nearest at load")
    group.add_argument("--device", default=engine.device,
                       help="torch device to run on, e.g. cpu, cuda, cuda:1; auto: CUDA if "
                            "available")
    group.add_argument("--tokenizer", default=engine.tokenizer,
                       help="tokenizer directory or id, if not the model's own")
    group.add_argument("--seed", type=int, default=engine.seed,
                       help="seed of the random weights of --load-format dummy (requests without "
                            "a seed of their own are not seeded by it)")
    group.add_argument("--enforce-eager", action="store_true", default=engine.enforce_eager,
                       help="CUDA: run decode steps kernel by kernel instead of replaying the "
                            "CUDA graphs captured at startup (slower; for debugging)")
    group.add_argument("--launch-ahead", choices=("auto", "on", "off"), default=engine.launch_ahead,
                       help="launch each engine step before reading the previous step's tokens, "
                            "so the GPU never waits for the host (a sequence that stops runs one "
                            "step more, discarded); auto: on for CUDA, off for CPU")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=engine.tensor_parallel_size,
                       help="split the model over this many GPUs of the node (one process each, "
                            "NCCL; gloo on CPU). Attention heads and the MLP's (or each expert's) "
                            "intermediate size must divide by it; KV heads must divide by it or "
                            "divide it (then they are replicated). NCCL_NVLS_ENABLE=0 is set for "
                            "every rank")
    group.add_argument("--no-warm-up", dest="warm_up", action="store_false", default=engine.warm_up,
                       help="skip the startup pass that runs every prefill size, decode batch size "
                            "and sampling path once so that no request waits for a kernel compile "
                            "(on a GPU it takes about as long as those compiles; on a CPU, with "
                            "nothing to compile, only the sampling paths run)")
    group = parser.add_argument_group("KV cache")
    group.add_argument("--block-size", type=int, default=cache.block_size,
                       help="tokens per KV cache block (the unit of allocation and of prefix "
                            "caching); default 16, and 64 for --kv-cache-dtype int4 and int2, "
                            "whose keys share one quantization range per channel per block")
    group.add_argument("--kv-cache-memory", type=parse_size, default=cache.kv_cache_memory,
                       help="bytes for the KV cache, e.g. 64MiB or 2GiB; unset: "
                            "--gpu-memory-utilization of the memory left after the weights")
    group.add_argument("--gpu-memory-utilization", type=float, default=cache.memory_fraction,
                       help="fraction of device memory that weights, activations and KV cache "
                            "may use together, when --kv-cache-memory is unset")
    group.add_argument("--kv-cache-dtype", default=cache.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                       help="storage of cached keys and values: auto (the model's dtype), "
                            "fp8_e4m3 (scaled per token and head), int8 (asymmetric, per token and "
                            "head), int4 or int2 (KIVI: keys per channel, values per token, each "
                            "sequence's last partial block kept in full precision, for int2 the "
                            "last full block and the first token (at int8) too); fp8_e4m3 and "
                            "int2 store each head's keys and values rotated (Hadamard), which "
                            "shrinks their error and changes no result; quantized "
                            "caches hold 1.9x (8-bit) to 6.2-6.5x (int2) the tokens of bf16")
    group.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                       default=cache.enable_prefix_caching,
                       help="keep full KV blocks findable by their tokens (and all before them), "
                            "so a prompt that starts like an earlier one prefills only the rest; "
                            "freed blocks stay cached until their memory is needed")
    group = parser.add_argument_group("scheduler")
    group.add_argument("--max-num-seqs", type=int, default=sched.max_num_seqs,
                       help="most sequences decoded together in one step")
    group.add_argument("--max-num-batched-tokens", type=int,
                       default=sched.max_num_batched_tokens,
                       help="most tokens (prefill and decode) processed in one step; longer "
                            "prompts are prefilled in chunks")
    group.add_argument("--max-model-len", type=int, default=sched.max_model_len,
                       help="context length (prompt + output tokens); unset: the model's")
    group.add_argument("--max-queue-len", type=int, default=sched.max_queue_len,
                       help="requests allowed to wait for admission; more are refused with "
                            "429 and Retry-After")


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    server = ServerConfig()
    group = parser.add_argument_group("HTTP server")
    group.add_argument("--host", default=server.host,
                       help="address to listen on; all interfaces by default, as vLLM does "
                            "(use 127.0.0.1 to keep the server local)")
    group.add_argument("--port", type=int, default=server.port, help="TCP port to listen on")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (/health, "
                            "/ready, /metrics stay open); default: $WATTSERVE_API_KEY, if set")
    group.add_argument("--served-model-name", nargs="+", default=server.served_model_names,
                       help="name(s) clients use in 'model'; the first is reported in "
                            "responses; unset: the checkpoint's name")
    group.add_argument("--request-timeout", type=float, default=server.request_timeout,
                       help="seconds a request may spend in the engine, queued and generating, "
                            "before it is aborted (408, or an error event when streaming); "
                            "unset: no limit")
    group.add_argument("--max-request-bytes", type=parse_size, default=server.max_request_bytes,
                       help="largest request body accepted (413 above it), e.g. 1MiB")
    group.add_argument("--responses-store-size", type=int, default=server.responses_store_size,
                       help="responses kept for GET /v1/responses/{id} and "
                            "previous_response_id (least recently used dropped first)")
    group.add_argument("--shutdown-grace-seconds", type=float,
                       default=server.shutdown_grace_seconds,
                       help="on SIGTERM, answer new requests with 503 and let in-flight ones "
                            "finish for this long, then end them with an error (a 503, or an "
                            "error event and [DONE] in a stream); a second signal stops at once")
    group.add_argument("--tool-call-parser", default=server.tool_call_parser,
                       choices=sorted(PARSERS),
                       help="the model's tool-call format, read for tool_choice 'auto' "
                            "(hermes: Hermes/Qwen2.5 <tool_call>; llama3_json: Llama 3.1/3.2; "
                            "mistral: [TOOL_CALLS]); unset: the one its chat template shows")
    group.add_argument("--log-level", default=server.log_level,
                       choices=["debug", "info", "warning", "error"], help="logging verbosity")


def _add_monitoring_args(parser: argparse.ArgumentParser) -> None:
    server, monitor = ServerConfig(), MonitorConfig()
    group = parser.add_argument_group("power and SLO monitoring")
    group.add_argument("--slo-ttft-ms", type=float, default=server.slo_ttft_ms,
                       help="time-to-first-token SLO in ms for the SLO attainment and goodput "
                            "metrics; a request's body can override it with "
                            '"slo": {"ttft_ms": ..., "tpot_ms": ...}')
    group.add_argument("--slo-tpot-ms", type=float, default=server.slo_tpot_ms,
                       help="time-per-output-token SLO in ms, (e2e - TTFT) / (tokens - 1) as "
                            "DistServe defines it")
    group.add_argument("--power-cap-watts", type=float, default=monitor.power_cap_watts,
                       help="keep the moving-average power of the engine's GPU under this by "
                            "admitting fewer tokens per step and then pacing steps; the GPU's "
                            "clocks and power limit are left alone")
    group.add_argument("--power-sample-interval-ms", type=float,
                       default=monitor.power_sample_interval_ms,
                       help="how often to read power, energy, temperature and clocks (NVML on "
                            "a GPU, RAPL on a CPU)")
    group.add_argument("--metrics-window-seconds", type=float,
                       default=server.metrics_window_seconds,
                       help="sliding window of the goodput, SLO attainment and energy-per-token "
                            "gauges")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, load_format=args.load_format, dtype=args.dtype, quantization=args.quantization,
        device=args.device,
        tokenizer=args.tokenizer, seed=args.seed, enforce_eager=args.enforce_eager,
        launch_ahead=args.launch_ahead, warm_up=args.warm_up, tensor_parallel_size=args.tensor_parallel_size,
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                          memory_fraction=args.gpu_memory_utilization,
                          kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=args.prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len,
                                  max_queue_len=args.max_queue_len))


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("WATTSERVE_API_KEY") or None,
        served_model_names=args.served_model_name, request_timeout=args.request_timeout,
        max_request_bytes=args.max_request_bytes, responses_store_size=args.responses_store_size,
        shutdown_grace_seconds=args.shutdown_grace_seconds, log_level=args.log_level,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        metrics_window_seconds=args.metrics_window_seconds, tool_call_parser=args.tool_call_parser)


def monitor_config(args: argparse.Namespace) -> MonitorConfig:
    return MonitorConfig(power_cap_watts=args.power_cap_watts,
                         power_sample_interval_ms=args.power_sample_interval_ms)


def serve(args: argparse.Namespace) -> None:
    from wattserve.engine.config import UnsupportedModelError
    from wattserve.engine.loader import ModelLoadError
    from wattserve.engine.mp_client import EngineStartError, MPClient
    from wattserve.server.app import build_app
    from wattserve.server.drain import ENDED_WRITE_S, DrainingServer

    config = server_config(args)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = MPClient.launch(engine_config(args), monitor_config(args), config.log_level)
    except (ModelLoadError, UnsupportedModelError, EngineStartError) as exc:  # no traceback
        sys.exit(f"wattserve: cannot load the model: {exc}")
    except ValueError as exc:  # --power-cap-watts without power readings
        sys.exit(f"wattserve: {exc}")
    app = build_app(engine, config)
    _log_startup(engine.info, app.state.server.model_names, config)
    server = DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, log_level=config.log_level,
        access_log=False,  # server.middleware logs each request with its id
        timeout_graceful_shutdown=ENDED_WRITE_S), app.state.server, config.shutdown_grace_seconds)
    engine.on_death = lambda: server.stop_after("the engine process died")
    server.run()
    if engine.error is not None:  # exit non-zero, so that an orchestrator restarts the server
        sys.exit(f"wattserve: {engine.error}")


def _log_startup(info: EngineInfo, names: list[str], config: ServerConfig) -> None:
    # The engine has logged dtype, device, KV blocks and context length as it loaded.
    log.info("serving %s (%s) as %s", info.model_name, info.model_path, ", ".join(names))
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    auth = ' -H "Authorization: Bearer $WATTSERVE_API_KEY"' if config.api_key else ""
    log.info("listening on http://%s:%d; try: curl http://%s:%d/v1/models%s", config.host,
             config.port, host, config.port, auth)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.config:
        try:
            preset = load_preset(args.config, add_serve_arguments)
        except PresetError as exc:
            parser.error(str(exc))
        # Parsed again with the file's values as defaults, so the command line wins.
        args = build_parser(preset).parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "top":
        from wattserve.server.top import run

        run(args.url, args.interval)


if __name__ == "__main__":
    sys.exit(main())
