"""Continuous batching: outputs do not depend on what else runs; preemption and n > 1 forks."""
import pytest

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.output_processor import OutputProcessor
from wattserve.engine.request import FinishReason, SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Name a color.", "Count to five.", "What is 2+2?",
    "Say hello in Spanish.", "What do bees make?", "Name a planet.", "What is water made of?",
    "Who wrote Hamlet?", "What is the opposite of hot?", "Give me a fruit.", "What day follows Monday?",
    "How many legs does a spider have?", "What is the largest ocean?", "Name a musical instrument.",
    "What color is the sky?",
]


def prompt(engine, question):
    return engine.tokenizer.encode(
        engine.tokenizer.render_chat([{"role": "user", "content": question}]), add_special_tokens=False)


def run(engine, requests):
    """requests: {id: (prompt_ids, params)} submitted together; returns {id: [tokens per choice]}."""
    processor = OutputProcessor(engine.tokenizer)  # stop strings are the caller's
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
        processor.add(rid, ids, params)
    out = {rid: [[] for _ in range(params.n)] for rid, (_, params) in requests.items()}
    reasons = {}
    while engine.has_work():
        for o in processor.process_all(engine.step(), engine.stop):
            for s in o.outputs:
                out[o.request_id][s.index] += s.token_ids
                if s.finish_reason:
                    reasons[(o.request_id, s.index)] = s.finish_reason
    return out, reasons


def assert_all_blocks_free(engine):
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert all(c == 0 for c in engine.kv.pool.ref_counts)
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def engine():
    return EngineCore(EngineConfig(cache=CacheConfig(kv_cache_memory=48 << 20),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=256)))


def test_sixteen_concurrent_greedy_requests_equal_their_outputs_alone(engine):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = {q: run(engine, {"a": (prompt(engine, q), greedy)})[0]["a"] for q in QUESTIONS}
    together, _ = run(engine, {q: (prompt(engine, q), greedy) for q in QUESTIONS})
    assert together == alone
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_reproducible_whatever_else_is_batched(engine):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    ids = prompt(engine, "Write a word.")
    alone, _ = run(engine, {"s": (ids, seeded)})
    noise = {f"n{i}": (prompt(engine, q), SamplingParams(temperature=1.0, max_tokens=16))
             for i, q in enumerate(QUESTIONS[:5])}
    together, _ = run(engine, {"s": (ids, seeded), **noise})
    assert together["s"] == alone["s"]
    other_seed, _ = run(engine, {"s": (ids, SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                             max_tokens=16, ignore_eos=True))})
    assert other_seed["s"] != alone["s"]


def test_n_greedy_choices_fork_the_prompt_and_equal_the_single_answer(engine):
    ids = prompt(engine, "What is the capital of France?")
    single, _ = run(engine, {"one": (ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))})
    several, _ = run(engine, {"three": (ids, SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))})
    # The prompt does not end on a block boundary, so forks copy its last block: a wrong copy
    # would change their tokens.
    assert len(ids) % engine.kv.block_size != 0
    assert several["three"] == single["one"] * 3
    assert_all_blocks_free(engine)


def test_n_seeded_choices_differ_from_each_other_and_reproduce(engine):
    ids = prompt(engine, "Tell me a story.")
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first, _ = run(engine, {"a": (ids, params)})
    second, _ = run(engine, {"a": (ids, params)})
    assert first == second
    assert len({tuple(c) for c in first["a"]}) == 3


def test_stop_string_and_max_tokens_finish_reasons(engine):
    ids = prompt(engine, "What is the capital of France?")
    out, reasons = run(engine, {"stop": (ids, SamplingParams(temperature=0, max_tokens=30, stop=["Paris"])),
                                "len": (ids, SamplingParams(temperature=0, max_tokens=3))})
    assert reasons[("stop", 0)] == FinishReason.STOP
    assert reasons[("len", 0)] == FinishReason.LENGTH and len(out["len"][0]) == 3
    assert "Paris" not in engine.tokenizer.decode(out["stop"][0][:-1])


def test_abort_frees_blocks_at_once(engine):
    engine.add_request("x", prompt(engine, "Tell me a long story."), SamplingParams(max_tokens=200))
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.pool.num_blocks
    engine.abort("x")
    assert_all_blocks_free(engine)


def test_preemption_when_blocks_run_out_keeps_every_output_and_frees_all_blocks():
    # 12 blocks x 16 tokens: one sequence fits, eight at once do not.
    small = EngineCore(EngineConfig(cache=CacheConfig(kv_cache_memory=12 * 16 * 30 * 2 * 3 * 64 * 4)))
    assert small.kv.pool.num_blocks == 12
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    questions = QUESTIONS[:8]
    alone = {q: run(small, {"a": (prompt(small, q), greedy)})[0]["a"] for q in questions}
    assert small.scheduler.num_preemptions == 0
    together, _ = run(small, {q: (prompt(small, q), greedy) for q in questions})
    assert small.scheduler.num_preemptions > 0
    assert together == alone
    assert_all_blocks_free(small)
