"""configs/*.yaml and `wattserve serve --config` (server/config_file.py): every preset sets
every option and loads; CPU presets start the engine, GPU presets (which cannot start here)
pass the flags' own checks; the command line overrides a file; bad files are named errors."""
import argparse
from pathlib import Path

import pytest
import yaml

from wattserve.engine.core import EngineCore
from wattserve.engine.request import SamplingParams
from wattserve.server.cli import add_serve_arguments, engine_config, parse_args, server_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def device(preset: Path) -> str:
    return yaml.safe_load(preset.read_text())["device"]


CPU_PRESETS = [p for p in PRESETS if device(p) == "cpu"]
GPU_PRESETS = [p for p in PRESETS if device(p).startswith("cuda")]


def serve(*argv: str) -> argparse.Namespace:
    return parse_args(["serve", *argv])


def preset_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


def refused(capsys, *argv: str) -> str:
    """What `wattserve serve ...` says as it exits with argparse's usage error."""
    with pytest.raises(SystemExit) as exit_:
        serve(*argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_the_presets_the_readme_names_are_there():
    assert {p.name for p in CPU_PRESETS} == {"smollm2-cpu.yaml"}
    assert {p.name for p in GPU_PRESETS} == {
        "llama-3.1-8b-h100-int4kv.yaml", "llama-3.1-8b-h100-latency.yaml",
        "llama-3.1-8b-h100-throughput.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_sets_every_option(preset):
    flags = argparse.ArgumentParser()
    add_serve_arguments(flags)
    options = {a.dest for a in flags._actions} - {"help"}
    keys = {key.replace("-", "_") for key in yaml.safe_load(preset.read_text())}
    assert keys == options, f"missing: {options - keys}, unknown: {keys - options}"


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.name)
def test_a_gpu_preset_validates(preset):
    args = serve("--config", str(preset))
    config = engine_config(args)
    assert config.device == "cuda" and config.dtype == "bfloat16"
    assert config.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert server_config(args).port == 8000


def test_the_int4_preset_asks_for_an_int4_cache():
    args = serve("--config", str(CONFIGS / "llama-3.1-8b-h100-int4kv.yaml"))
    assert engine_config(args).cache.kv_cache_dtype == "int4"


@pytest.mark.parametrize("preset", CPU_PRESETS, ids=lambda p: p.name)
def test_a_cpu_preset_starts_the_engine(preset):
    config = engine_config(serve("--config", str(preset)))
    engine = EngineCore(config)
    assert engine.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert engine.kv.pool.num_blocks == (
        config.cache.kv_cache_memory // engine.runner.bytes_per_block(config.cache.block_size))
    ids = engine.tokenizer.encode(engine.tokenizer.render_chat(
        [{"role": "user", "content": "What is the capital of France?"}]), add_special_tokens=False)
    engine.add_request("r", ids, SamplingParams(temperature=0, max_tokens=8))
    tokens = []
    while engine.has_work():
        tokens += [t for out in engine.step() for s in out.outputs for t in s.token_ids]
    assert "Paris" in engine.tokenizer.decode(tokens)


def test_flags_override_the_file(tmp_path):
    path = preset_file(tmp_path, "max-num-seqs: 8\nport: 9000\nmodel: a.gguf\n")
    args = serve("--config", path, "--port", "9001", "b.gguf")
    assert (args.max_num_seqs, args.port, args.model) == (8, 9001, "b.gguf")
    assert serve("--port", "9001", "--config", path).port == 9001  # whatever the order


def test_values_go_through_the_flags_types(tmp_path):
    path = preset_file(tmp_path, "kv-cache-memory: 2GiB\nmax_request_bytes: 4MiB\n"
                                 "request-timeout: 30\nserved-model-name: [a, b]\n"
                                 "enforce-eager: true\nmax-model-len: null\n")
    args = serve("--config", path)
    assert (args.kv_cache_memory, args.max_request_bytes) == (2 << 30, 4 << 20)
    assert args.request_timeout == 30.0 and isinstance(args.request_timeout, float)
    assert args.served_model_name == ["a", "b"]
    assert args.enforce_eager is True and args.max_model_len is None


def test_unknown_keys_are_named(tmp_path, capsys):
    path = preset_file(tmp_path, "max-num-seqs: 8\nmax-num-seq: 8\nkv_cache: 1GiB\n")
    err = refused(capsys, "--config", path)
    assert f"{path}: unknown options max-num-seq, kv_cache;" in err


@pytest.mark.parametrize("text, message", [
    ("max-num-seqs: many\n", "argument --max-num-seqs: invalid int value: 'many'"),
    ("dtype: float64\n", "argument --dtype: invalid choice: 'float64'"),
    ("kv-cache-memory: lots\n", "argument --kv-cache-memory: not a size: 'lots'"),
    ("port: [8000, 8001]\n", "port: [8000, 8001] is not a value this option takes"),
    ("enforce-eager: 1\n", "enforce-eager is a switch: true or false, not 1"),
    ("max-num-seqs: null\n", "max-num-seqs cannot be null (its default is 64)"),
    ("prot: 1\n", "unknown option prot;"),
    ("max-num-seqs: 1\nmax_num_seqs: 2\n", "max-num-seqs and max_num_seqs set the same option"),
    ("- port\n", "expected option: value lines, found list"),
    ("port: [\n", "is not valid YAML"),
])
def test_bad_values_are_named_with_the_file(tmp_path, capsys, text, message):
    path = preset_file(tmp_path, text)
    err = refused(capsys, "--config", path)
    assert path in err and message in err


def test_a_missing_file_is_an_error(tmp_path, capsys):
    err = refused(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert "cannot read" in err and "nope.yaml" in err
