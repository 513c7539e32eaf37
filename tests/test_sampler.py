import torch

from wattserve.engine.request import SamplingParams
from wattserve.engine.sampler import Sampler
from wattserve.engine.sequence import Sequence

EOS = 0


def seq(prompt=(5, 6), output=(), **params):
    s = Sequence("r", 0, list(prompt), SamplingParams(**params), 100)
    s.token_ids += list(output)
    return s


def logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_takes_argmax_and_logprobs_are_raw():
    tokens, lps = Sampler([EOS]).sample(logits([0.0, 1.0, 3.0, 2.0]), [seq(temperature=0, logprobs=2)]).resolve()
    assert tokens == [2]
    want = torch.log_softmax(torch.tensor([0.0, 1.0, 3.0, 2.0]), -1)
    assert abs(lps[0].logprob - want[2].item()) < 1e-6
    assert [t for t, _ in lps[0].top] == [2, 3]


def test_seeded_draws_repeat_and_do_not_depend_on_batch_neighbours():
    row = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    alone = Sampler([EOS]).sample(logits(row), [seq(temperature=1.0, seed=3)]).resolve()[0][0]
    draws = []
    for _ in range(3):
        s = seq(temperature=1.0, seed=3)
        draws.append([Sampler([EOS]).sample(logits(row, row), [seq(temperature=1.0), s]).resolve()[0][1] for _ in range(20)])
    assert draws[0] == draws[1] == draws[2]
    assert draws[0][0] == alone
    assert len(set(draws[0])) > 1  # it really samples


def test_top_k_one_and_tiny_top_p_are_greedy():
    row = [0.1, 2.0, 1.9, -1.0]
    sampler = Sampler([EOS])
    for params in ({"top_k": 1}, {"top_p": 0.01}, {"min_p": 0.99}):
        got = {sampler.sample(logits(row), [seq(temperature=1.5, **params)]).resolve()[0][0] for _ in range(30)}
        assert got == {1}, params


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    row = probs.log().tolist()
    got = {Sampler([EOS]).sample(logits(row), [seq(temperature=1.0, top_p=0.8)]).resolve()[0][0] for _ in range(200)}
    assert got == {0, 1}


def test_logit_bias_forces_and_bans_tokens():
    row = [5.0, 0.0, 0.0, 0.0]
    assert Sampler([EOS]).sample(logits(row), [seq(temperature=0, logit_bias={3: 100.0})]).resolve()[0] == [3]
    assert Sampler([EOS]).sample(logits(row), [seq(temperature=0, logit_bias={0: -100.0})]).resolve()[0] != [0]


def test_penalties_follow_openai_and_hf_rules():
    row = [0.0, 2.0, 1.5, 0.0]
    # token 1 was generated twice: frequency 0.5 * 2 + presence 0.1 pushes it below token 2
    s = seq(output=(1, 1), temperature=0, frequency_penalty=0.5, presence_penalty=0.1)
    assert Sampler([EOS]).sample(logits(row), [s]).resolve()[0] == [2]
    # repetition penalty covers the prompt too: prompt token 1 at 2.0 / 2 = 1.0 < 1.5
    s = seq(prompt=(1,), temperature=0, repetition_penalty=2.0)
    assert Sampler([EOS]).sample(logits(row), [s]).resolve()[0] == [2]


def test_min_tokens_masks_eos_and_stop_tokens():
    row = [9.0, 1.0, 8.0, 0.0]
    s = seq(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert Sampler([EOS]).sample(logits(row), [s]).resolve()[0] == [1]
