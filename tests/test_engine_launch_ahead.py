"""Launching each step before reading the last one's tokens changes nothing a client sees:
the same tokens, texts, finish reasons and logprobs as stepping one at a time, every block
freed, and the step statistics still add up. Run on CPU with launch_ahead="on" (its default
there is off), where the device tokens are CPU tensors but the bookkeeping is the same."""
import re

import pytest

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.output_processor import OutputProcessor
from wattserve.engine.request import SamplingParams
from wattserve.engine.sequence import PLACEHOLDER
from wattserve.engine.structured.spec import OutputConstraint
from wattserve.engine.stats import StatsObserver
from test_engine_batching import QUESTIONS, assert_all_blocks_free, prompt


def make(launch_ahead: str, kv_memory: int = 48 << 20) -> EngineCore:
    return EngineCore(EngineConfig(launch_ahead=launch_ahead, cache=CacheConfig(kv_cache_memory=kv_memory),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8)))


@pytest.fixture(scope="module")
def engines():
    return {"off": make("off"), "on": make("on")}


def collect(engine, requests, abort_after=None):
    """requests: {id: (prompt_ids, params)}; returns {id: (text per choice, tokens per choice,
    finish reasons, logprob token ids)}; `abort_after`: (request id, steps) aborts it then."""
    processor = OutputProcessor(engine.tokenizer)  # text and stop strings are the caller's
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
        processor.add(rid, ids, params)
    out = {rid: {"text": [""] * p.n, "tokens": [[] for _ in range(p.n)], "reasons": [None] * p.n,
                 "logprobs": [[] for _ in range(p.n)]} for rid, (_, p) in requests.items()}
    steps = 0
    while engine.has_work():
        for o in processor.process_all(engine.step(), engine.stop):
            for s in o.outputs:
                r = out[o.request_id]
                r["text"][s.index] += s.text
                r["tokens"][s.index] += s.token_ids
                r["reasons"][s.index] = s.finish_reason or r["reasons"][s.index]
                r["logprobs"][s.index] += [(lp.token_id, [t for t, _ in lp.top]) for lp in s.logprobs or []]
        steps += 1
        if abort_after and steps == abort_after[1]:
            engine.abort(abort_after[0])
            processor.remove(abort_after[0])
    return out


def mixed_requests(engine):
    """Every way a sequence can end or be sampled, batched together."""
    ask = [prompt(engine, q) for q in QUESTIONS]
    return {
        "greedy-eos": (ask[0], SamplingParams(temperature=0, max_tokens=64)),
        "greedy-len": (ask[1], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)),
        "one-token": (ask[2], SamplingParams(temperature=0, max_tokens=1)),
        "stop-string": (ask[3], SamplingParams(temperature=0, max_tokens=40, stop=["4", "four"])),
        "seeded-n3": (ask[4], SamplingParams(temperature=1.0, top_p=0.9, seed=7, n=3, max_tokens=12)),
        "logprobs": (ask[5], SamplingParams(temperature=0, max_tokens=9, logprobs=3)),
        "penalties": (ask[6], SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3,
                                             presence_penalty=0.5, ignore_eos=True)),
        "min-tokens": (ask[7], SamplingParams(temperature=0, max_tokens=10, min_tokens=10)),
        # A grammar's mask needs the last token read: drawn after it, the forward pass ahead.
        "regex": (ask[0], SamplingParams(temperature=0, max_tokens=20,
                                         structured=OutputConstraint("regex", "[0-9]{3}-[a-z]{2,5}"))),
        "json-seeded": (ask[1], SamplingParams(temperature=1.0, seed=3, max_tokens=24, structured=OutputConstraint(
            "json_schema", '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'))),
    }


def test_mixed_batch_same_outputs_as_one_step_at_a_time(engines):
    off = collect(engines["off"], mixed_requests(engines["off"]))
    on = collect(engines["on"], mixed_requests(engines["on"]))
    assert on == off
    assert off["greedy-len"]["reasons"] == ["length"] and off["one-token"]["tokens"][0].__len__() == 1
    assert off["stop-string"]["reasons"] == ["stop"] and len(off["seeded-n3"]["tokens"]) == 3
    assert re.fullmatch("[0-9]{3}-[a-z]{2,5}", off["regex"]["text"][0]) and off["regex"]["reasons"] == ["stop"]
    for engine in engines.values():
        assert_all_blocks_free(engine)


def test_the_next_step_reads_its_input_from_the_device_before_the_host_has_it(engines):
    """After the first call, a decoding sequence's last token is a placeholder and the step
    that consumes it is already launched."""
    engine = engines["on"]
    engine.add_request("p", prompt(engine, "Name a planet."), SamplingParams(temperature=0, max_tokens=5,
                                                                             ignore_eos=True))
    engine.step()  # launches the prefill and, ahead of reading it, the first decode
    (seq,) = engine.scheduler.running
    assert seq.token_ids[-1] == PLACEHOLDER and PLACEHOLDER not in seq.token_ids[:-1]
    assert engine._in_flight is not None
    while engine.has_work():
        engine.step()
    assert_all_blocks_free(engine)


def test_abort_while_a_step_is_in_flight_frees_everything(engines):
    for engine in engines.values():
        ids = prompt(engine, "Tell me a long story.")
        out = collect(engine, {"x": (ids, SamplingParams(temperature=0, max_tokens=200)),
                               "y": (ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))},
                      abort_after=("x", 3))
        assert len(out["y"]["tokens"][0]) == 6
        assert_all_blocks_free(engine)


def test_preemption_under_a_tiny_cache_keeps_outputs(engines):
    tiny = make("on", kv_memory=24 * 16 * 30 * 2 * 3 * 64 * 4)  # 24 blocks of 16 tokens (fp32)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    requests = {q: (prompt(tiny, q), greedy) for q in QUESTIONS[:8]}
    want = collect(engines["off"], requests)
    got = collect(tiny, requests)
    assert got == want
    assert tiny.scheduler.num_preemptions > 0
    assert_all_blocks_free(tiny)


def test_prefix_cache_keys_blocks_only_once_their_tokens_are_read(engines):
    """A block filled by a token still on its way from the device is not cached under the
    placeholder: a later prompt that continues the first answer hits the blocks of its
    generated tokens too, and every output equals stepping one at a time."""
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = {}
    for mode, engine in engines.items():
        ids = prompt(engine, "Tell me about the moon.")
        first = collect(engine, {"a": (ids, greedy)})["a"]["tokens"][0]
        hits = HitCounter()
        engine.observers.append(hits)
        again = collect(engine, {"b": (ids + first, greedy)})["b"]["tokens"][0]
        engine.observers.remove(hits)
        block = engine.kv.block_size
        assert hits.tokens == (len(ids) + len(first) - 1) // block * block, mode  # prompt and answer blocks
        results[mode] = (first, again)
        assert_all_blocks_free(engine)
    assert results["on"] == results["off"]


class HitCounter(StatsObserver):
    def __init__(self):
        self.tokens = 0

    def on_step(self, step):
        self.tokens += step.prefix_cache_hits


def test_a_full_batch_ending_together_waits_for_kivi_rings():
    """int4 holds one ring per running sequence. A batch that reaches its length limit in one
    step leaves the running ones at once but frees its rings only when that step's tokens are
    read, after the next step (launched ahead) was scheduled: that step admits no one rather
    than take a ring that is not free (it ran out: MemoryError, on the H200 at 512 sequences)."""
    engine = EngineCore(EngineConfig(launch_ahead="on", cache=CacheConfig(kv_cache_memory=48 << 20,
                                                                          kv_cache_dtype="int4"),
                                     scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=2)))
    ask = prompt(engine, QUESTIONS[0])
    requests = {f"r{i}": (ask, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)) for i in range(4)}
    out = collect(engine, requests)
    assert all(len(r["tokens"][0]) == 3 and r["reasons"] == ["length"] for r in out.values())
    assert len({tuple(r["tokens"][0]) for r in out.values()}) == 1  # same prompt, same greedy tokens
    assert_all_blocks_free(engine)
    assert engine.kv.num_rings_held == 0


def test_an_id_reused_after_an_abort_with_a_step_in_flight():
    """The aborted request's token, still in flight, is dropped: it must not land in the new
    request that took its id (it once appended to freed blocks and crashed)."""
    engine, reference = make("on"), make("off")
    ids = prompt(engine, QUESTIONS[0])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("r0", ids, params)
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None  # a step launched ahead, its tokens unread
    engine.abort("r0")
    again = collect(engine, {"r0": (ids, params)})
    assert again == collect(reference, {"r0": (ids, params)})
    assert len(again["r0"]["tokens"][0]) == 8
    assert_all_blocks_free(engine)
