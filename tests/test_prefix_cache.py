"""Automatic prefix caching. The KV manager: block keys, longest-prefix lookup, LRU eviction,
reference counts. The engine: greedy outputs equal those of an engine without the cache for
overlapping prompts (prefixes ending mid-block, identical prompts, a prompt that continues an
earlier answer), under eviction and preemption, with int8, int4 and int2 caches; the hits counted
are the tokens expected. /metrics counts them."""
import pytest
import torch

from wattserve.engine.block_hash import chain_seed, extend_block_hashes
from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.core import EngineCore
from wattserve.engine.kv_cache import KVCacheManager
from wattserve.engine.request import SamplingParams
from wattserve.engine.stats import StatsObserver, StepStats
from wattserve.kernels.kv_format import bytes_per_block, bytes_per_ring, default_block_size, kv_format
from test_engine_batching import QUESTIONS, assert_all_blocks_free, run


# ---- the KV manager (block size 4) ---------------------------------------------------------
def computed(kv: KVCacheManager, seq_id: int, tokens: list[int]) -> int:
    """Admit `tokens` as the scheduler does and compute them all; the tokens found cached."""
    prefix = kv.cached_prefix(seq_id, tokens)
    kv.allocate(seq_id, len(tokens), prefix)
    kv.cache_full_blocks(seq_id, tokens, len(tokens))
    return len(prefix) * kv.block_size


def test_a_blocks_key_stands_for_everything_before_it_and_the_dtype():
    seed = chain_seed("auto", 4)
    a, b, int8 = [], [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, seed)
    extend_block_hashes(b, [0, 2, 3, 4, 5, 6, 7, 8], 4, seed)
    extend_block_hashes(int8, [1, 2, 3, 4, 5, 6, 7, 8], 4, chain_seed("int8", 4))
    assert len(a) == 2  # the partly filled block has no key
    assert a[1] != b[1]  # the same tokens after a different block
    assert not set(a) & set(int8)
    resumed = a[:1]
    extend_block_hashes(resumed, [1, 2, 3, 4, 5, 6, 7, 8], 4, seed)
    assert resumed == a


def test_a_sequence_starts_from_its_longest_cached_prefix_of_full_blocks():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    first = list(range(10))  # blocks [0-3] [4-7] and a partial [8, 9]
    assert computed(kv, 1, first) == 0
    assert computed(kv, 2, first[:6] + [50, 51, 52]) == 4  # the shared prefix ends mid-block
    assert computed(kv, 3, first[:9] + [60]) == 8
    assert computed(kv, 4, first) == 8  # identical: the partial block is computed again
    assert computed(kv, 5, first[:8]) == 4  # at a block boundary the last token is still computed
    assert computed(kv, 6, [99] + first) == 0
    assert kv.tables[4][:2] == kv.tables[1][:2]
    assert [kv.pool.ref_counts[b] for b in kv.tables[1]] == [5, 3, 1]
    # seq 1's two blocks, 2's [4, 5, 50, 51] and 6's two: seq 5's copy of [4-7] stays unkeyed.
    assert kv.pool.num_cached == 5
    for seq_id in range(1, 7):
        kv.free(seq_id)
    assert kv.num_free_blocks == 16 and not any(kv.pool.ref_counts)
    assert kv.pool.num_cached == 5


def test_freed_blocks_stay_cached_until_needed_and_the_least_recent_go_first():
    kv = KVCacheManager(6, 4, enable_prefix_caching=True)
    computed(kv, 1, list(range(8)))
    computed(kv, 2, list(range(100, 108)))
    kv.free(1)
    kv.free(2)
    assert kv.num_free_blocks == 6 and kv.pool.num_cached == 4
    kv.allocate(3, 8)  # the two blocks that never held a key go first
    assert kv.pool.num_cached == 4
    kv.allocate(3, 12)  # then seq 1's, freed first, last block first
    assert kv.pool.num_cached == 3
    assert len(kv.cached_prefix(4, list(range(9)))) == 1
    assert len(kv.cached_prefix(5, list(range(100, 109)))) == 2


def test_admission_counts_the_free_cached_blocks_it_takes():
    kv = KVCacheManager(4, 4, enable_prefix_caching=True)
    computed(kv, 1, list(range(12)))
    kv.free(1)  # three free cached blocks and one never used
    tokens = list(range(12)) + [7, 7, 7, 7]
    prefix = kv.cached_prefix(2, tokens)
    assert len(prefix) == 3
    assert kv.can_admit(2, prefix, 16) and not kv.can_admit(2, prefix, 17)
    kv.allocate(2, 16, prefix)
    assert kv.tables[2][:3] == prefix and kv.num_free_blocks == 0


def test_freeing_one_holder_keeps_the_blocks_another_still_uses():
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    computed(kv, 1, list(range(10)))
    assert computed(kv, 2, list(range(10))) == 8
    shared = kv.tables[2][:2]
    kv.free(1)  # preempted or aborted
    assert [kv.pool.ref_counts[b] for b in shared] == [1, 1]
    kv.allocate(3, 4 * kv.num_free_blocks)  # every free block
    assert not set(kv.tables[3]) & set(kv.tables[2])


def test_without_prefix_caching_nothing_is_cached():
    kv = KVCacheManager(8, 4)
    computed(kv, 1, list(range(10)))
    kv.free(1)
    assert computed(kv, 2, list(range(10))) == 0 and kv.pool.num_cached == 0


# ---- the engine: the default model, with and without the cache ------------------------------
SYSTEM = ("You are the help desk of a public library. Answer every question in one short sentence. "
          "When a question is about a book, say on which floor and shelf it would be found; when it is "
          "about opening hours, say that the library opens at nine and closes at six, except on Sundays. "
          "Never invent a title that the catalogue does not hold, and ask the reader to spell a name "
          "when you are not sure of it.")  # 87 tokens
OTHER_SYSTEM = ("You answer questions for a small museum of clocks and watches. Keep every answer short "
                "and friendly, and point the visitor to the right room: pocket watches are on the first "
                "floor, tower clocks in the courtyard, and the workshop, where a clockmaker repairs old "
                "movements every Saturday morning, is behind the shop. Tickets cost five euros.")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make_engine(prefix_caching: bool, kv_cache_dtype: str = "auto", num_blocks: int = 64) -> EngineCore:
    """The default model with a KV cache of `num_blocks` blocks (and, for KIVI, a ring
    for each of its 8 sequences)."""
    fmt, bs = kv_format(kv_cache_dtype), default_block_size(kv_cache_dtype)
    layers, heads, dim = 30, 3, 64  # SmolLM2-135M
    memory = layers * num_blocks * bytes_per_block(fmt, bs, heads, dim, torch.float32)
    if fmt.kivi:
        memory += layers * 8 * bytes_per_ring(fmt, bs, heads, dim, torch.float32)
    engine = EngineCore(EngineConfig(
        cache=CacheConfig(kv_cache_dtype=kv_cache_dtype, kv_cache_memory=memory,
                          enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256)))
    assert engine.kv.pool.num_blocks == num_blocks
    return engine


def overlapping_prompts(engine: EngineCore, system_text: str = SYSTEM) -> list[list[int]]:
    """A system text cut after 13 to all of its tokens (mostly mid-block), each cut followed by
    a question, and the same prompt twice."""
    system = engine.tokenizer.encode(system_text, add_special_tokens=False)
    questions = [engine.tokenizer.encode(" Question: " + q, add_special_tokens=False) for q in QUESTIONS]
    cuts = [len(system), 13, 37, 37, 64, 70, len(system), 21]
    prompts = [system[:cut] + q for cut, q in zip(cuts, questions)]
    return prompts + [prompts[0]]


def run_in_waves(engine: EngineCore, prompts: list[list[int]], waves: int) -> list[list[int]]:
    """Greedy tokens of each prompt; the prompts go in `waves` groups, each after the last ends."""
    tokens = []
    size = -(-len(prompts) // waves)
    for w in range(0, len(prompts), size):
        out, _ = run(engine, {i: (p, GREEDY) for i, p in enumerate(prompts[w : w + size], start=w)})
        tokens += [out[i][0] for i in range(w, w + len(out))]
    return tokens


class HitCounter(StatsObserver):
    def __init__(self):
        self.queries = self.hits = 0

    def on_step(self, step: StepStats) -> None:
        self.queries += step.prefix_cache_queries
        self.hits += step.prefix_cache_hits


@pytest.fixture(scope="module")
def engines():
    return make_engine(prefix_caching=True), make_engine(prefix_caching=False)


@pytest.mark.parametrize("waves", [1, 3])
def test_overlapping_prompts_give_the_tokens_computed_without_the_cache(engines, waves):
    cached, plain = engines
    counter = HitCounter()
    cached.observers[:] = [counter]
    prompts = overlapping_prompts(cached)
    assert run_in_waves(cached, prompts, waves) == run_in_waves(plain, prompts, waves)
    assert counter.hits > 0 and counter.queries >= sum(map(len, prompts))
    assert_all_blocks_free(cached)
    assert cached.kv.pool.num_cached > 0  # kept for the next requests


def test_hits_are_the_full_blocks_of_the_longest_computed_prefix(engines):
    cached, _ = engines
    bs = cached.kv.block_size
    counter = HitCounter()
    cached.observers[:] = [counter]
    start = cached.tokenizer.encode("Catalogue entry 4471: ", add_special_tokens=False)  # new to the cache
    ask = start + cached.tokenizer.encode(SYSTEM, add_special_tokens=False)[:30]
    assert len(ask) % bs and len(ask) > 2 * bs

    def hits(prompt: list[int], max_tokens: int = 1) -> tuple[int, list[int]]:
        counter.hits = counter.queries = 0
        out, _ = run(cached, {"r": (prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))})
        assert counter.queries == len(prompt)
        return counter.hits, out["r"][0]

    assert hits(ask)[0] == 0
    again, answer = hits(ask, max_tokens=20)
    assert again == len(ask) // bs * bs  # the same prompt again: its full blocks
    assert hits(ask[: 2 * bs])[0] == bs  # ends on a boundary: the last block is computed
    assert hits(ask[: bs + 3] + [42] * 9)[0] == bs  # diverges mid-block
    # The answer's blocks were cached too: all but its last token were computed.
    follow_up = ask + answer + start
    assert hits(follow_up)[0] == (len(ask) + len(answer) - 1) // bs * bs
    assert_all_blocks_free(cached)


def test_a_request_waits_a_step_for_the_prefix_another_is_computing_then_takes_it_from_the_cache(engines):
    cached, plain = engines
    counter = HitCounter()
    cached.observers[:] = [counter]
    shared = cached.tokenizer.encode("Reading room rules, edition 12. " + SYSTEM, add_special_tokens=False)
    requests = {q: (shared + cached.tokenizer.encode(" Question: " + q, add_special_tokens=False), GREEDY)
                for q in QUESTIONS[:4]}
    cached.add_request("first", *requests.pop(QUESTIONS[0]))
    for rid, request in requests.items():
        cached.add_request(rid, *request)
    cached.step()
    assert len(cached.scheduler.running) == 1  # the others wait rather than compute it again
    while cached.has_work():
        cached.step()
    assert counter.hits == 3 * (len(shared) // cached.kv.block_size * cached.kv.block_size)
    assert_all_blocks_free(cached)


def test_n_choices_start_from_the_cache_and_share_their_prompt(engines):
    cached, plain = engines
    prompt = overlapping_prompts(cached)[2]
    params = SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True)
    want, _ = run(plain, {"n": (prompt, params)})
    run(cached, {"warm": (prompt, GREEDY)})
    cached.add_request("n", prompt, params)
    outputs = cached.step()
    full = len(prompt) // cached.kv.block_size
    tables = [cached.kv.tables[s.seq_id] for s in cached.requests["n"].seqs]
    assert tables[0][:full] == tables[1][:full] == tables[2][:full]
    assert {cached.kv.pool.ref_counts[b] for b in tables[0][:full]} == {3}
    got = [[] for _ in range(3)]
    while True:
        for out in outputs:
            for s in out.outputs:
                got[s.index] += s.token_ids
        if not cached.has_work():
            break
        outputs = cached.step()
    assert got == want["n"]
    assert_all_blocks_free(cached)


def tokens_of(request_id: str, outputs) -> list[int]:
    return [t for out in outputs if out.request_id == request_id for s in out.outputs for t in s.token_ids]


def test_aborting_one_of_two_sequences_sharing_blocks_leaves_the_other_its_blocks(engines):
    cached, plain = engines
    prompts = overlapping_prompts(cached)
    shared = 87 // cached.kv.block_size  # prompts 0 and 6 share the whole system text
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _ = run(plain, {"b": (prompts[6], long)})
    cached.add_request("a", prompts[0], long)
    cached.step()
    cached.add_request("b", prompts[6], long)
    got = tokens_of("b", cached.step())
    a, b = (cached.kv.tables[cached.requests[r].seqs[0].seq_id] for r in ("a", "b"))
    assert a[:shared] == b[:shared]
    cached.abort("a")
    assert all(cached.kv.pool.ref_counts[block] == 1 for block in b)
    while cached.has_work():
        got += tokens_of("b", cached.step())
    assert got == want["b"][0]
    assert_all_blocks_free(cached)


def test_eviction_and_preemption_under_a_tiny_cache_keep_every_output():
    """8 blocks of 16 tokens hold one or two of these sequences: all at once, running ones are
    preempted; the second group's blocks evict the first's, which then comes again."""
    cached, plain = make_engine(True, num_blocks=8), make_engine(False, num_blocks=8)
    first = overlapping_prompts(cached)[:6]
    second = overlapping_prompts(cached, OTHER_SYSTEM)[:4]
    keys = set()
    for prompt in first + second:
        chain: list[bytes] = []
        extend_block_hashes(chain, prompt, 16, b"")
        keys.update(chain)
    assert len(keys) > 8  # the prompts' distinct full blocks alone overflow the cache
    for group in (first, second, first):
        assert run_in_waves(cached, group, 1) == run_in_waves(plain, group, 1)
    assert cached.scheduler.num_preemptions > 0
    assert_all_blocks_free(cached)


def quantized_engines(kv_cache_dtype: str) -> tuple[EngineCore, EngineCore]:
    num_blocks = 1024 // default_block_size(kv_cache_dtype)
    return make_engine(True, kv_cache_dtype, num_blocks), make_engine(False, kv_cache_dtype, num_blocks)


@pytest.mark.parametrize("kv_cache_dtype", ["int4", "int2"])
def test_a_kivi_cache_gives_the_tokens_computed_without_the_cache(kv_cache_dtype):
    """int4 and int2 are KIVI: blocks of 64, the last ones in a ring (int4: the partial
    block; int2: the last full one too). Hits end on a block boundary, and int2 computes a
    hit's last block again, so a sequence starts from cached quantized blocks and an empty
    ring and reads every block as it would have without the cache. One prompt at a time: a
    quantized code depends on float rounding, which depends on what else is batched (see
    test_kv_quant.py); alone, both engines write the same blocks."""
    cached, plain = quantized_engines(kv_cache_dtype)
    counter = HitCounter()
    cached.observers[:] = [counter]
    prompts = overlapping_prompts(cached, SYSTEM + " " + SYSTEM)  # int2 hits from 2 blocks of 64 on
    assert run_in_waves(cached, prompts, len(prompts)) == run_in_waves(plain, prompts, len(prompts))
    assert counter.hits > 0
    assert_all_blocks_free(cached)
    assert cached.kv.num_rings_held == 0


def first_token_logprobs(engine: EngineCore, prompt: list[int]) -> dict[int, float]:
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    logprobs = []
    while engine.has_work():
        logprobs += [s.logprobs[0] for out in engine.step() for s in out.outputs]
    (first,) = logprobs
    return dict(first.top)


def test_an_int8_cache_moves_the_log_probs_no_more_than_chunking_the_prefill_does():
    """int8 quantizes each token as it is written. The tokens after a hit are computed in a
    shorter prefill than without the cache, so their values round differently (~1e-6) and now
    and then land on the other code; near-ties then flip greedy tokens. Splitting the prefill
    into chunks, without any cache, moves the first token's log-probs by up to 0.11 on these
    prompts: a wrong or stale block would move them by far more."""
    cached, plain = quantized_engines("int8")
    counter = HitCounter()
    cached.observers[:] = [counter]
    for prompt in overlapping_prompts(cached):
        got, want = first_token_logprobs(cached, prompt), first_token_logprobs(plain, prompt)
        shared = got.keys() & want.keys()
        assert len(shared) >= 4 and max(abs(got[t] - want[t]) for t in shared) < 0.2
    assert counter.hits > 0
    assert_all_blocks_free(cached)


# ---- /metrics -------------------------------------------------------------------------------
def test_metrics_count_the_hits_of_a_repeated_prompt(live_server, openai_client, served_model):
    prompt = "Library notice 9123. " + SYSTEM  # new to the server's cache
    queries, hits = "wattserve:prefix_cache_queries_total", "wattserve:prefix_cache_hits_total"
    seen = [live_server.metrics()]
    for _ in range(2):
        done = openai_client.completions.create(model=served_model, prompt=prompt, max_tokens=1, temperature=0)
        seen.append(live_server.metrics())
    n = done.usage.prompt_tokens
    assert [after[queries] - before[queries] for before, after in zip(seen, seen[1:])] == [n, n]
    assert [after[hits] - before[hits] for before, after in zip(seen, seen[1:])] == [0, (n - 1) // 16 * 16]
