"""Warm-up: it runs every planned shape and sampler path, then leaves the engine as it found it."""
import pytest
import torch

from test_engine_batching import QUESTIONS, assert_all_blocks_free, prompt, run
from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.cuda_graphs import graph_batch_sizes
from wattserve.engine.request import SamplingParams
from wattserve.engine.stats import StatsObserver
from wattserve.engine.warmup import warm_up, waves

MAX_NUM_SEQS, BUDGET = 8, 64  # small, so the full (CUDA) plan runs on CPU in seconds


def engine(warm: bool) -> EngineCore:
    return EngineCore(EngineConfig(warm_up=warm, cache=CacheConfig(kv_cache_memory=32 << 20),
                                   scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS,
                                                             max_num_batched_tokens=BUDGET)))


class Visits:
    """What each step of the engine ran: its shape, and its sampled rows' parameters."""

    def __init__(self, core: EngineCore):
        self.steps = []  # (number of sequences, tokens, longest query)
        self.params = []
        self.forks = 0
        self.prefix_hits = 0
        execute, sample = core.runner.execute, core.sampler.sample
        fork, schedule = core.kv.fork, core.scheduler.schedule

        def spy_execute(inputs, *args):
            self.steps.append((inputs.num_seqs, sum(inputs.num_new), max(inputs.num_new)))
            return execute(inputs, *args)

        def spy_sample(logits, seqs):
            self.params += [s.params for s in seqs]
            return sample(logits, seqs)

        def spy_fork(*args):
            self.forks += 1
            return fork(*args)

        def spy_schedule():
            batch = schedule()
            self.prefix_hits += batch.prefix_cache_hits
            return batch

        core.runner.execute, core.sampler.sample, core.kv.fork = spy_execute, spy_sample, spy_fork
        core.scheduler.schedule = spy_schedule


@pytest.fixture(scope="module")
def cold():
    return engine(warm=False)


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def warm():
    """Warmed up as a server's engine is: on CPU, the sampler paths only."""
    return engine(warm=True)


@pytest.fixture(scope="module")
def full(cold):
    """The cold engine after the full plan, with what the plan ran; `before`: its greedy outputs
    for a few questions before it."""
    before = run(cold, {q: (prompt(cold, q), GREEDY) for q in QUESTIONS[:4]})
    visits = Visits(cold)
    visits.before = before
    rng = torch.get_rng_state()
    preemptions = cold.scheduler.num_preemptions
    seconds = warm_up(cold, full=True)
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), rng) and cold.scheduler.num_preemptions == preemptions
    return visits


def test_full_plan_prefills_every_power_of_two_up_to_the_budget_alone(full):
    alone = {tokens for seqs, tokens, longest in full.steps if seqs == 1 and tokens == longest}
    assert {1, 2, 4, 8, 16, 32, 64} <= alone


def test_full_plan_decodes_at_every_cuda_graph_batch_size(full):
    decode_batches = {seqs for seqs, tokens, longest in full.steps if longest == 1}
    assert set(graph_batch_sizes(MAX_NUM_SEQS)) <= decode_batches


def test_full_plan_runs_every_sampler_path_forks_and_a_prefix_hit(full):
    ps = full.params
    assert any(p.temperature == 0 for p in ps) and any(p.top_p < 1 for p in ps)
    assert any(p.top_k for p in ps) and any(p.min_p for p in ps) and any(p.repetition_penalty != 1 for p in ps)
    assert any(p.presence_penalty and p.frequency_penalty for p in ps)
    assert any(p.logit_bias for p in ps) and any(p.min_tokens for p in ps)
    assert any(p.logprobs for p in ps) and any(p.seed is not None for p in ps)
    assert full.forks >= 2 and full.prefix_hits > 0


def test_full_plan_leaves_no_block_used_or_cached(cold, full):
    assert_all_blocks_free(cold)
    assert cold.kv.pool.num_cached == 0


def test_warm_up_prompts_do_not_hit_the_prefix_cache_afterwards(cold, full):
    class Hits(StatsObserver):
        hits = 0

        def on_step(self, step):
            Hits.hits += step.prefix_cache_hits

    cold.observers.append(Hits())
    try:
        hit_wave = waves(cold, full=True)[-1]  # the plan's prompts are the same each time
        run(cold, {f"u{i}": (ids, params) for i, (ids, params) in enumerate(hit_wave)})
    finally:
        cold.observers.clear()
    assert Hits.hits == 0


def test_greedy_outputs_equal_those_of_the_engine_before_warm_up(cold, full, warm):
    requests = {q: (prompt(cold, q), GREEDY) for q in QUESTIONS[:4]}
    assert run(cold, requests) == full.before == run(warm, requests)


def test_cpu_warm_up_runs_the_sampler_paths_only(warm):
    assert_all_blocks_free(warm)
    visits = Visits(warm)
    warm_up(warm)
    assert max(longest for _, _, longest in visits.steps) <= 3  # short prompts: no ladder
    assert visits.forks >= 2 and any(p.seed is not None for p in visits.params)
    assert_all_blocks_free(warm)
    assert warm.kv.pool.num_cached == 0


def test_warm_up_refuses_an_engine_with_work(warm):
    warm.add_request("r", [1, 2, 3], SamplingParams(max_tokens=1))
    try:
        with pytest.raises(AssertionError):
            warm_up(warm)
    finally:
        warm.abort_all()
