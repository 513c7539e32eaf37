"""Configuration dataclasses: validated once at the edge (CLI, loader), plain values inside."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wattserve.kernels.kv_format import default_block_size, kv_format



class UnsupportedModelError(ValueError):
    """The checkpoint is not a decoder family we can run."""


@dataclass
class ModelConfig:
    """Shapes and variants of one decoder; variants are fields, not subclasses
    (engine/families.py sets them from each family's config.json)."""

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
    # Mixture of experts (Mixtral, Qwen3-MoE, OLMoE); num_experts 0 is a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k router probabilities to sum to 1
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if known
    # "head": RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3); "proj": over
    # the whole q and k projections (OLMo 2).
    qk_norm: str | None = None
    # "pre": a norm before attention and before the MLP; "sandwich": also after each (Gemma
    # 2/3); "post": after each only (OLMo 2).
    norm_placement: str = "pre"
    norm_weight_offset: float = 0.0  # Gemma's norms scale by 1 + weight; added at load
    hidden_act: str = "silu"  # "gelu_tanh": GeGLU (Gemma)
    embedding_scale: float = 1.0  # Gemma: sqrt(hidden_size)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # Gemma 2: cap * tanh(score / cap)
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # keys a query sees, itself included, on sliding layers
    sliding_layers: list[bool] | None = None  # None: every layer, when sliding_window is set
    local_rope_theta: float | None = None  # Gemma 3's sliding layers (without rope scaling)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From an HF config.json's fields; raises UnsupportedModelError for other families."""
        from wattserve.engine.families import model_config_fields

        return cls(**model_config_fields(cfg))


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
    # Ranks (GPUs of one node) the model is split over (engine/tensor_parallel.py).
    tensor_parallel_size: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
