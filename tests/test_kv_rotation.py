"""Rotated KV formats (kernels/kv_rotation.py): R is orthogonal, the ops hide it from the
model, and it shrinks fp8's error where queries and keys share outlier channels."""
import pytest
import torch

from wattserve.kernels.attention import AttentionMetadata
from wattserve.kernels.dispatch import REFERENCE_OPS
from wattserve.kernels.kv_format import allocate_layer, kv_format
from wattserve.kernels.kv_quant import dequantize_fp8, quantize_fp8
from wattserve.kernels.kv_rotation import rotation
from wattserve.kernels.rotary import rope_cos_sin


@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_rotation_is_orthogonal(head_dim):
    r = rotation(head_dim, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    if head_dim != 96:  # Hadamard: every entry +-1/sqrt(d)
        torch.testing.assert_close(r.abs(), torch.full_like(r, head_dim**-0.5))


def test_ops_over_a_rotated_cache_answer_in_the_model_basis():
    """rotary_write_kv + paged_attention over an fp8 cache (rotated) give what the same ops
    give over an unquantized one, within fp8's error; the cache holds rotated keys."""
    torch.manual_seed(0)
    n, heads, kvh, d, bs = 40, 4, 2, 64, 16
    q, k, v = torch.randn(n, heads, d), torch.randn(n, kvh, d), torch.randn(n, kvh, d)
    table = [3, 0, 2]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([table[i // bs] * bs + i % bs for i in range(n)]),
        block_tables=torch.tensor([table], dtype=torch.int32), context_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), query_lens=[n], context_lens_host=[n])
    positions, cos_sin = torch.arange(n), rope_cos_sin(d, 10000.0, None, n)
    outs = {}
    for name in ("auto", "fp8_e4m3"):
        cache = allocate_layer(kv_format(name), 4, bs, kvh, d, torch.float32, torch.device("cpu"))
        q_cache = REFERENCE_OPS.rotary_write_kv(q.clone(), k.clone(), v.clone(), positions, cos_sin, cache, meta)
        outs[name] = REFERENCE_OPS.paged_attention(q_cache, cache, meta, d**-0.5)
        if name == "auto":
            rope_k = cache.k.view(-1, kvh, d)[meta.slot_mapping]
        else:
            stored = dequantize_fp8(cache.k.view(-1, kvh, d)[meta.slot_mapping], cache.k_scale.view(-1, kvh)[meta.slot_mapping])
            r = rotation(d, torch.float32, torch.device("cpu"))
            assert ((stored - rope_k @ r).norm() / stored.norm()).item() < 0.04  # fp8: 3 mantissa bits
    rel = ((outs["fp8_e4m3"] - outs["auto"]).norm() / outs["auto"].norm()).item()
    assert rel < 0.03


def test_rotation_shrinks_fp8_score_error_when_queries_and_keys_share_outlier_channels():
    """Keys' outliers come in RoPE pairs (channels c and c + d/2) whose phase turns with the
    position, so no single channel is a token's maximum, the one value fp8's per-token scale
    keeps exact."""
    gen = torch.Generator().manual_seed(0)
    d = 128
    k, q = torch.randn(512, d, generator=gen), torch.randn(64, d, generator=gen)
    k_phase, q_phase = torch.rand(512, generator=gen) * 6.28, torch.rand(64, generator=gen) * 6.28
    for channel in (5, 9, 13):
        k[:, channel] += 10.0 * k_phase.cos()
        k[:, channel + d // 2] += 10.0 * k_phase.sin()
        q[:, channel] += 10.0 * q_phase.cos()
        q[:, channel + d // 2] += 10.0 * q_phase.sin()
    exact = q @ k.T

    def fp8_scores(q, k):
        return q @ dequantize_fp8(*quantize_fp8(k)).T

    r = rotation(d, torch.float32, torch.device("cpu"))
    plain = (fp8_scores(q, k) - exact).pow(2).mean().sqrt()
    rotated = (fp8_scores(q @ r, k @ r) - exact).pow(2).mean().sqrt()
    assert rotated < 0.8 * plain  # measured 0.62
