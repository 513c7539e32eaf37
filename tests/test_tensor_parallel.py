"""Tensor parallelism on CPU with real ranks: worker processes joined by gloo, each holding its
shard, against the same model on one rank.

Logit bound: both sides run in float32 and differ only in the order of sums (a row-parallel
projection adds N partial dot products in an all-reduce; the embedding's masked lookups add
zeros), a few ulps per layer: 1e-4 of the largest logit, the bound used against transformers
(tests/hf_oracle.py), is far below any gap that decides a greedy token.
"""
import os
import signal
import time

import pytest
import torch
from hf_oracle import PROMPTS, TINY, save_tiny
from test_moe_models import build_tiny_moe
from test_prefix_cache import SYSTEM, HitCounter, overlapping_prompts, run_in_waves

from wattserve.engine.llm import LLM, prompt_logits
from wattserve.engine.loader.hf import read_config
from wattserve.engine.request import SamplingParams
from wattserve.kernels.kv_format import KV_CACHE_DTYPES, bytes_per_block, kv_format

REL_BOUND = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# Few enough blocks that the three prompts (7 blocks of 16 by the end) preempt each other.
NUM_BLOCKS = 5


def tiny_llama(directory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny(LlamaForCausalLM, LlamaConfig(**TINY, vocab_size=tokenizer.vocab_size), directory, tokenizer)


def tiny_qwen3(directory, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim apart from hidden / heads, and q/k norms per head (replicated on every rank).
    config = Qwen3Config(**TINY, head_dim=32, vocab_size=tokenizer.vocab_size)
    return save_tiny(Qwen3ForCausalLM, config, directory, tokenizer)


FAMILIES = {"llama": tiny_llama, "qwen3": tiny_qwen3,
            "qwen3_moe": lambda directory, tokenizer: build_tiny_moe("qwen3_moe", directory, tokenizer)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("llama")
    tiny_llama(directory, tokenizer)
    return str(directory)


def engine(model: str, tp: int, num_blocks: int | None = None, **options) -> LLM:
    """`num_blocks`: a cache of that many blocks of 16 tokens, whatever a block takes on a
    rank (its share of the KV heads)."""
    if num_blocks is not None:
        cfg = read_config(model)
        heads = max(1, cfg.num_kv_heads // tp)
        options["kv_cache_memory"] = num_blocks * cfg.num_layers * bytes_per_block(
            kv_format("auto"), 16, heads, cfg.head_dim, torch.float32)
    return LLM(model, device="cpu", warm_up=False, tensor_parallel_size=tp, **options)


def prompt_ids(llm: LLM) -> list[list[int]]:
    return [llm.core.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS]


def assert_same_logits(one: LLM, many: LLM, prompts: list[list[int]]) -> None:
    for ids in prompts:
        ref, ours = prompt_logits(one.core, ids), prompt_logits(many.core, ids)
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < REL_BOUND, f"max relative logit error {rel:.2e}"


def tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [g.choices[0].token_ids for g in llm.generate(prompts, params)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_ranks_give_one_ranks_logits_and_greedy_tokens_through_preemption(family, tmp_path, tokenizer):
    """Both with the same number of blocks (one rank's block holds twice the KV heads), so
    that the same sequences are preempted at the same steps; the two ranks also launch each
    step ahead, their inputs read from the last step's tokens broadcast from rank 0."""
    FAMILIES[family](tmp_path, tokenizer)
    threads = torch.get_num_threads()
    one = engine(str(tmp_path), 1, NUM_BLOCKS)
    prompts = prompt_ids(one)
    want = tokens(one, prompts)
    with engine(str(tmp_path), 2, NUM_BLOCKS, launch_ahead="on") as two:
        assert two.core.kv.pool.num_blocks == NUM_BLOCKS
        assert_same_logits(one, two, prompts)
        assert tokens(two, prompts) == want
        assert two.core.scheduler.num_preemptions > 0
        with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
            engine(str(tmp_path), 2)  # a second one would take over the first's process group
    # Closed: the ranks stopped, and this process has its CPU threads back from the ranks' share.
    assert torch.get_num_threads() == threads and not torch.distributed.is_initialized()


def test_three_ranks_split_the_default_models_nine_heads_and_three_kv_heads(tmp_path, tokenizer):
    """SmolLM2-135M Q4_1 GGUF: its quantized o_proj and down_proj split along their blocks of
    32 columns (576 / 3 and 1536 / 3 are whole blocks)."""
    tokenizer.hf.save_pretrained(tmp_path)  # read back in well under the GGUF's seconds
    options = dict(tokenizer=str(tmp_path), kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    one = LLM(device="cpu", warm_up=False, **options)
    prompts = prompt_ids(one)
    want = tokens(one, prompts, params)
    with LLM(device="cpu", warm_up=False, tensor_parallel_size=3, **options) as three:
        assert three.core.runner.model.cfg.num_heads == 3 and three.core.runner.model.cfg.num_kv_heads == 1
        assert_same_logits(one, three, prompts[:1])
        assert tokens(three, prompts, params) == want


@pytest.mark.parametrize("kv_cache_dtype", [d for d in KV_CACHE_DTYPES if d != "auto"])
def test_quantized_kv_caches_with_prefix_caching_split_by_kv_head(llama_dir, kv_cache_dtype):
    """Every format quantizes per KV head (per token, or per channel over a block for KIVI's
    keys, whose rings stay full precision), so each rank's half of the heads holds the codes
    one rank holds for them; prompts sharing prefixes hit the cache alike."""
    runs = {}
    for tp in (1, 2):
        llm = engine(llama_dir, tp, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=16 << 20, max_num_seqs=8)
        counter = HitCounter()
        llm.core.observers.append(counter)
        prompts = overlapping_prompts(llm.core, SYSTEM + " " + SYSTEM)  # long enough for int2's rings
        runs[tp] = run_in_waves(llm.core, prompts, 3), counter.hits
        llm.close()
    assert runs[2][0] == runs[1][0]
    assert runs[2][1] == runs[1][1] > 0


def test_model_shapes_that_do_not_split_are_refused_before_any_process_starts(llama_dir):
    from wattserve.engine.config import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="4 attention heads do not divide by it"):
        LLM(llama_dir, device="cpu", warm_up=False, tensor_parallel_size=3)


def test_the_sharded_weights_are_slices_of_the_full_ones(llama_dir):
    """Rows of column-parallel q and gate, input columns of row-parallel o_proj and down_proj,
    the vocabulary of the embedding: rank 1's halves."""
    from wattserve.engine.config import ModelConfig
    from wattserve.engine.loader import load_checkpoint
    from wattserve.engine.tensor_parallel import Shard
    from wattserve.engine.tp_weights import shard_weights

    ckpt = load_checkpoint(llama_dir, with_tokenizer=False, sliced=True)  # rank 1 reads its slices only
    full = dict(load_checkpoint(llama_dir, with_tokenizer=False).weights)
    cfg: ModelConfig = ckpt.model_config
    half = dict(shard_weights(ckpt.weights, cfg, Shard(1, 2, cfg.vocab_size)))
    layer = "model.layers.0."
    q_rows = cfg.num_heads // 2 * cfg.head_dim
    assert torch.equal(half[layer + "self_attn.q_proj.weight"], full[layer + "self_attn.q_proj.weight"][q_rows:])
    assert torch.equal(half[layer + "self_attn.k_proj.weight"],
                       full[layer + "self_attn.k_proj.weight"][cfg.head_dim:])  # the second of 2 KV heads
    assert torch.equal(half[layer + "self_attn.o_proj.weight"], full[layer + "self_attn.o_proj.weight"][:, q_rows:])
    inter = cfg.intermediate_size // 2
    assert torch.equal(half[layer + "mlp.down_proj.weight"], full[layer + "mlp.down_proj.weight"][:, inter:])
    assert torch.equal(half[layer + "input_layernorm.weight"], full[layer + "input_layernorm.weight"])
    assert torch.equal(half["model.embed_tokens.weight"], full["model.embed_tokens.weight"][cfg.vocab_size // 2:])


def test_served_at_two_ranks_then_a_killed_rank_is_an_openai_error_and_the_server_stops(llama_dir, tmp_path):
    """Through `wattserve serve`, where rank 0 is the engine core's own process: the killed
    rank's error reaches the client at once (gloo sees the connection close; no timeout)."""
    import re

    import openai
    from conftest import LiveServer

    with LLM(llama_dir, device="cpu", warm_up=False) as one:
        want = one.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    server = LiveServer((llama_dir, "--device", "cpu", "--tensor-parallel-size", "2", "--no-warm-up"),
                        tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model=os.path.basename(llama_dir), prompt=PROMPTS[0], max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.choices[0].text
        worker = int(re.search(r"worker pids \[(\d+)\]", server.log()).group(1))
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError, match="rank 1") as error:
            client.completions.create(model=os.path.basename(llama_dir), prompt=PROMPTS[0], max_tokens=8)
        assert error.value.status_code == 503 and time.monotonic() - start < 20
        client.close()  # uvicorn's shutdown waits for kept-alive connections
        assert server.proc.wait(30) != 0
    finally:
        server.stop()


@pytest.mark.parametrize("quantize", ["int4", "fp8", "int4 cut through a group"])
def test_quantized_weights_split_into_the_slices_of_their_dense_weight(quantize):
    """Rows through every plane, columns along whole groups (fp8: one scale per row, kept);
    a cut through a group dequantizes."""
    from wattserve.engine.config import ModelConfig
    from wattserve.engine.tensor_parallel import Shard
    from wattserve.engine.tp_weights import shard_weights
    from wattserve.kernels.weight_format import QuantizedWeight, dequantize, quantize_fp8, quantize_int4

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=256, intermediate_size=320 if "cut" in quantize
                      else 512, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64)
    gen = torch.Generator().manual_seed(0)

    def make(n, k):
        w = torch.randn(n, k, generator=gen)
        return quantize_fp8(w) if quantize == "fp8" else quantize_int4(w, 64)

    full = {"model.layers.0.self_attn.k_proj.weight": make(128, 256),
            "model.layers.0.mlp.down_proj.weight": make(256, cfg.intermediate_size)}
    rank1 = dict(shard_weights(full.items(), cfg, Shard(1, 2, cfg.vocab_size)))
    k, down = rank1["model.layers.0.self_attn.k_proj.weight"], rank1["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(k, QuantizedWeight)
    assert torch.equal(dequantize(k), dequantize(full["model.layers.0.self_attn.k_proj.weight"])[64:])
    half = cfg.intermediate_size // 2  # 160: 2.5 groups of 64, or 256: 4 whole groups
    want = dequantize(full["model.layers.0.mlp.down_proj.weight"])[:, half:]
    assert torch.equal(down if "cut" in quantize else dequantize(down), want)
    assert isinstance(down, QuantizedWeight) != ("cut" in quantize)
