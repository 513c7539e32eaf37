"""Hugging Face model directories: config.json, safetensors shards, the tokenizer files."""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from wattserve.engine.config import ModelConfig
from wattserve.engine.loader import ModelLoadError


def read_config(directory: str) -> ModelConfig:
    """ModelConfig from config.json, with generation_config.json's EOS ids added."""
    cfg = _read_json(os.path.join(directory, "config.json"))
    try:
        config = ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise ModelLoadError(f"{directory}/config.json lacks {e}") from e
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        # Chat models often list their end-of-turn token only here (Llama 3: <|eot_id|>).
        gen_eos = _read_json(gen_path).get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *gen_eos]))
    return config


def safetensors_weights(directory: str, sliced: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every parameter, read lazily one tensor at a time; `sliced`: each
    tensor unread (safetensors' PySafeSlice), for engine/tp_weights.py to read only a rank's
    slices of.

    The files and their tensor names are listed now, so that a missing or corrupt shard
    fails the load before any weight is read.
    """
    names: dict[str, list[str]] = {}
    for file in _weight_files(directory):
        try:
            with safe_open(file, framework="pt") as f:
                # Older Llama checkpoints save the rotary inverse frequencies; the model
                # computes them.
                names[file] = [n for n in f.keys() if not n.endswith("rotary_emb.inv_freq")]
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"could not read {file}: {e}") from e
    return _read_tensors(names, sliced)


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a tokenizer from {source}: {e}") from e


def chat_template(hf_tokenizer: Any, directory: str) -> str | None:
    """The tokenizer's chat template (transformers reads tokenizer_config.json and
    chat_template.jinja), else the processor-style chat_template.json of multimodal repos."""
    template = hf_tokenizer.chat_template
    if isinstance(template, dict):  # named templates; "default" is the one for plain chat
        template = template.get("default")
    path = os.path.join(directory, "chat_template.json")
    if template is None and os.path.isfile(path):
        template = _read_json(path).get("chat_template")
    return template


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map") or {}
        files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
    elif os.path.isfile(single):
        # Other files beside it (Mistral's consolidated.safetensors) hold the same weights
        # under other names.
        files = [single]
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelLoadError(
            f"{directory} has no *.safetensors weights (pytorch_model.bin checkpoints are not "
            "supported; convert them to safetensors, or pass a .gguf file)"
        )
    return files


def _read_tensors(names: dict[str, list[str]], sliced: bool) -> Iterator[tuple[str, Any]]:
    with tqdm(total=sum(map(len, names.values())), desc="Loading weights", unit="tensor") as bar:
        for file, file_names in names.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    yield name, f.get_slice(name) if sliced else f.get_tensor(name)
                    bar.update()


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"could not read {path}: {e}") from e
