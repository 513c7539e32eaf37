"""Rotary embedding and RMSNorm references against transformers' Llama implementation."""
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from wattserve.kernels.norm import add_rms_norm_ref, rms_norm_ref
from wattserve.kernels.rotary import apply_rotary_ref, rope_cos_sin, rope_inv_freq

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_inv_freq(scaling):
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                      rope_parameters={"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})})
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    inv, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    return inv.double()


def test_llama31_scaled_frequencies_match_transformers():
    ours = rope_inv_freq(128, 500000.0, LLAMA31_SCALING)
    torch.testing.assert_close(ours, hf_inv_freq(LLAMA31_SCALING), rtol=1e-6, atol=0)


def test_rotary_matches_transformers_apply():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 8, 64, generator=gen)
    k = torch.randn(7, 2, 64, generator=gen)
    positions = torch.tensor([0, 1, 2, 15, 16, 1000, 4095])
    table = rope_cos_sin(64, 10000.0, None, 4096)
    q2, k2 = apply_rotary_ref(q, k, positions, table)
    inv = rope_inv_freq(64, 10000.0, None)
    freqs = torch.outer(positions.double(), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().float(), emb.sin().float()
    # transformers wants [batch, heads, seq, dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(q2, q_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2, k_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_rms_norm_and_fused_residual_add_match_transformers():
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, 96, generator=gen), torch.randn(5, 96, generator=gen)
    hf = LlamaRMSNorm(96, eps=1e-5)
    hf.weight.data = torch.rand(96, generator=gen) + 0.5
    torch.testing.assert_close(rms_norm_ref(x, hf.weight, 1e-5), hf(x))
    out, new_res = add_rms_norm_ref(x, res, hf.weight, 1e-5)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, hf(x + res))


def test_longrope_table_uses_short_factors_inside_the_original_context_and_long_past_it():
    """Phi-3-mini-128k's shape (head_dim 96, original context 4096): rows before 4096 are
    transformers' short-factor frequencies, rows from 4096 on its long-factor ones (what it
    uses once a sequence outgrows the original context), both times its attention factor."""
    from transformers import Phi3Config

    from wattserve.engine.families import model_config_fields

    gen = torch.Generator().manual_seed(0)
    short = (1 + torch.rand(48, generator=gen)).tolist()
    long = (1 + 20 * torch.rand(48, generator=gen)).tolist()
    hf_cfg = Phi3Config(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
                        original_max_position_embeddings=4096,
                        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    scaling = model_config_fields({**hf_cfg.to_dict(), "architectures": ["Phi3ForCausalLM"]})["rope_scaling"]
    positions = torch.tensor([0, 1, 100, 4095, 4096, 4097])
    ours = rope_cos_sin(96, 10000.0, scaling, 131072)[positions]
    fn = ROPE_INIT_FUNCTIONS["longrope"]
    short_inv, factor = fn(hf_cfg, "cpu")
    long_inv, _ = fn(hf_cfg, "cpu", seq_len=4097)
    assert factor == scaling["attention_factor"] and factor > 1
    inv = torch.where((positions < 4096)[:, None], short_inv.double(), long_inv.double())
    freqs = positions[:, None].double() * inv
    want = torch.cat([freqs.cos(), freqs.sin()], -1) * factor
    # transformers' frequencies are float32 (relative rounding 6e-8): at position 4097 the
    # angle moves by up to 3e-4 rad.
    torch.testing.assert_close(ours, want.float(), rtol=0, atol=1e-3)
