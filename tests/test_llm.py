"""LLM.generate: the same tokens as the engine driven by hand, in prompt order, for text or ids."""
import itertools

import pytest
from test_engine_batching import QUESTIONS, assert_all_blocks_free, prompt, run

from wattserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from wattserve.engine.llm import LLM
from wattserve.engine.request import FinishReason, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=48 << 20, max_num_batched_tokens=256)


def test_options_are_routed_to_their_configs(llm):
    assert llm.core.config == EngineConfig(cache=CacheConfig(kv_cache_memory=48 << 20),
                                           scheduler=SchedulerConfig(max_num_batched_tokens=256))
    with pytest.raises(TypeError):
        LLM(no_such_option=1)
    with pytest.raises(TypeError):
        LLM(EngineConfig(), device="cpu")


def test_greedy_outputs_equal_the_engine_driven_by_hand_in_prompt_order(llm):
    # Mixed lengths, so requests finish their prefills (and first tokens) in another order.
    prompts = [prompt(llm.core, q) for q in QUESTIONS[:6]] + [list(range(100, 160)), [42]]
    by_hand, _ = run(llm.core, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    results = llm.generate(prompts, GREEDY)
    assert [r.prompt_token_ids for r in results] == prompts
    assert [[c.token_ids for c in r.choices] for r in results] == [by_hand[str(i)] for i in range(len(prompts))]
    for r in results:
        (choice,) = r.choices
        assert choice.finish_reason == FinishReason.LENGTH
        assert r.stats.arrival_time < r.stats.first_token_time <= r.stats.finish_time
        assert r.stats.generation_tokens == 10
    assert_all_blocks_free(llm.core)


def test_text_and_token_ids_give_the_same_result(llm):
    text = "The capital of France is"
    from_text, from_ids = llm.generate([text, llm.core.tokenizer.encode(text)], GREEDY)
    assert from_text.prompt_token_ids == from_ids.prompt_token_ids
    assert from_text.choices == from_ids.choices
    assert from_text.choices[0].text == llm.core.tokenizer.decode(from_text.choices[0].token_ids)


def test_duplicate_prompts_and_repeated_calls_get_their_own_requests(llm):
    ids = prompt(llm.core, "Name a color.")
    first = llm.generate([ids, ids, ids], GREEDY)
    again = llm.generate([ids], GREEDY)
    assert len(first) == 3
    assert {tuple(r.choices[0].token_ids) for r in first + again} == {tuple(first[0].choices[0].token_ids)}


def test_n_choices_and_one_params_per_prompt(llm):
    ids = prompt(llm.core, "What is the capital of France?")
    several, short = llm.generate([ids, ids], [SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True),
                                               SamplingParams(temperature=0, max_tokens=3)])
    single = llm.generate([ids], GREEDY)[0].choices[0]
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert all(c.token_ids == single.token_ids and c.finish_reason == FinishReason.LENGTH for c in several.choices)
    assert short.choices[0].token_ids == single.token_ids[:3]
    with pytest.raises(ValueError):
        llm.generate([ids, ids], [GREEDY])


def test_a_stop_string_ends_the_text_before_it(llm):
    (result,) = llm.generate([prompt(llm.core, "What is the capital of France?")],
                             SamplingParams(temperature=0, max_tokens=30, stop=["Paris"]))
    assert result.choices[0].finish_reason == FinishReason.STOP
    assert "Paris" not in result.choices[0].text


def test_an_invalid_prompt_raises_and_leaves_the_engine_empty(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([prompt(llm.core, "Name a planet."), []], GREEDY)
    assert_all_blocks_free(llm.core)
    assert llm.generate([[42]], GREEDY)[0].choices[0].token_ids


def test_a_closed_loop_keeps_max_in_flight_and_on_step_ends_it(llm):
    endless = ([100 + i % 50] * 8 for i in itertools.count())
    in_flight, steps = [], itertools.count(1)

    def watch(outputs):
        in_flight.append(len(llm.core.requests))
        return next(steps) == 11  # odd: mid-way through requests of two steps each

    results = llm.generate(endless, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                           max_in_flight=3, on_step=watch)
    assert max(in_flight) == 3 and len(in_flight) == 11
    finished = [r for r in results if r.choices[0].finish_reason == FinishReason.LENGTH]
    aborted = [r for r in results if r.choices[0].finish_reason == FinishReason.ABORT]
    assert len(finished) > 3 and 0 < len(aborted) <= 3 and len(finished) + len(aborted) == len(results)
    assert all(len(r.choices[0].token_ids) == 2 for r in finished)
    assert_all_blocks_free(llm.core)
