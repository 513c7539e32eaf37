"""Prompt logprobs (engine/prompt_logprobs.py): HF transformers' on the same GGUF with the
prompt prefilled in chunks, and the same again when its blocks are cached or n > 1.
(tests/test_api_completions.py checks them unchunked, through echo.)"""
import os

import pytest
import torch

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.loader import default_model_path
from wattserve.engine.request import SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."


def prompt_logprobs(engine, ids, **params):
    params = {"temperature": 0, "max_tokens": 2, "prompt_logprobs": 2, **params}
    engine.add_request("r", ids, SamplingParams(**params))
    got = []
    while engine.has_work():
        got += [o.prompt_logprobs for o in engine.step() if o.prompt_logprobs is not None]
    assert len(got) == 1, "prompt logprobs come once"
    return got[0]


@pytest.fixture(scope="module")
def chunked_engine():
    # Chunks of 8 tokens: a prompt of ~20 is scored over three steps.
    return EngineCore(EngineConfig(cache=CacheConfig(kv_cache_memory=32 << 20, block_size=4),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=8)))


def test_prompt_logprobs_equal_transformers(chunked_engine):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    ids = chunked_engine.tokenizer.encode(TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    got = prompt_logprobs(chunked_engine, ids)
    assert len(got) == len(ids) and got[0] is None
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours = torch.tensor([lp.logprob for lp in got[1:]])
    assert [lp.token_id for lp in got[1:]] == ids[1:]
    # fp32 on both sides: logits agree to ~1e-4 of the largest (tests/test_engine_model.py),
    # about 2e-3 absolute for this model; a logprob moves by at most twice a logit's error.
    assert (ours - want).abs().max() < 5e-3
    for lp, row in zip(got[1:], ref):
        top_ids = row.topk(2).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        assert abs(lp.top[0][1] - row[top_ids[0]].item()) < 5e-3


def test_same_whatever_cache_or_n(chunked_engine):
    ids = chunked_engine.tokenizer.encode(TEXT)
    first = prompt_logprobs(chunked_engine, ids)
    cached = prompt_logprobs(chunked_engine, ids)  # its blocks are in the prefix cache now
    forked = prompt_logprobs(chunked_engine, ids, n=3, temperature=1.0, seed=1)
    for other in (cached, forked):
        assert [lp and lp.token_id for lp in other] == [lp and lp.token_id for lp in first]
        diff = max(abs(a.logprob - b.logprob) for a, b in zip(first[1:], other[1:]))
        assert diff == 0  # the same chunks, computed again
