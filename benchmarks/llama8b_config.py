"""Llama-3.1-8B's shapes, which the GPU benchmarks run with random weights (bf16).

`python benchmarks/llama8b_config.py DIR` writes them as DIR/config.json: a checkpoint that
`wattserve serve DIR --load-format dummy` serves with random weights (and the default model's
tokenizer unless --tokenizer names one).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
# The same family at toy shapes, for the benchmarks' --tiny runs on CPU.
TINY_LLAMA = {**LLAMA31_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 49152,
              "torch_dtype": "float32"}


def write_checkpoint_dir(directory: str | Path | None = None, config: dict = LLAMA31_8B) -> Path:
    """`directory` (a new temporary one if None) with `config` as its config.json."""
    path = Path(directory or tempfile.mkdtemp())
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_checkpoint_dir(sys.argv[1]))
