"""Configuration dataclasses: validated once at the edge (CLI, loader), plain values inside."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wattserve.kernels.kv_format import default_block_size, kv_format

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family decoder we can run."""


@dataclass
class ModelConfig:
    """Shapes and variants of one Llama-family model; variants are fields, not subclasses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if known

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch or cfg.get('model_type', '?')!r} is not supported; "
                f"wattserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope settings into `rope_parameters`; older configs keep `rope_theta`.
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (llama3, linear are)")
    return {**scaling, "rope_type": kind}


@dataclass
class CacheConfig:
    block_size: int | None = None  # None: 16, or 64 for int4 and int2 (see kernels/kv_format.py)
    kv_cache_memory: int | None = None  # bytes; None: a fraction of free memory
    memory_fraction: float = 0.9
    kv_cache_dtype: str = "auto"  # one of kernels.kv_format.KV_CACHE_DTYPES
    enable_prefix_caching: bool = True  # reuse the cached KV blocks of shared prompt prefixes

    def __post_init__(self):
        kv_format(self.kv_cache_dtype)  # rejects an unknown name
        if self.block_size is None:
            self.block_size = default_block_size(self.kv_cache_dtype)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_queue_len: int = 1024


@dataclass
class MonitorConfig:
    """Power readings and the power cap, run beside the engine core (engine/monitor.py)."""

    power_cap_watts: float | None = None
    power_sample_interval_ms: float = 100.0


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct Q4_1 GGUF)
    load_format: str = "auto"  # auto | gguf | safetensors | dummy
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's (or bfloat16) on CUDA
    # Format the linear weights run in: one of engine.weight_loading.QUANTIZATIONS.
    quantization: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    seed: int = 0
    enforce_eager: bool = False  # CUDA: run decode steps op by op instead of replaying graphs
    # Launch each step before reading the last one's tokens (engine/core.py): auto | on | off;
    # auto is on for CUDA, off for CPU.
    launch_ahead: str = "auto"
    # Run every shape and sampling path once before serving, so no request waits for a Triton
    # compile or a first cuBLAS call (engine/warmup.py).
    warm_up: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
