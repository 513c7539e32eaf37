"""engine/structured: constraint validation, the compile cache and waiting room, and the logits
mask against a per-token reference, on the default model's tokenizer (no model)."""
import json
from concurrent.futures import wait

import pytest
import torch

from wattserve.engine.request import InvalidRequestError, SamplingParams
from wattserve.engine.sampler import reads_own_tokens
from wattserve.engine.sequence import Sequence
from wattserve.engine.structured.bitmask import mask_logits, unpack_bitmask
from wattserve.engine.structured.compiler import GrammarCompiler
from wattserve.engine.structured.spec import OutputConstraint

DIGITS = OutputConstraint("regex", "[0-9]{2}")


def _allowed_ref(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bit t % 32 of word t // 32 allows token t: the definition, one token at a time."""
    words = bitmask.tolist()
    return torch.tensor([[bool(row[t // 32] >> (t % 32) & 1) for t in range(vocab)] for row in words])


def test_unpack_bitmask_matches_per_token_reference():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31, (3, 5), dtype=torch.int64, generator=gen).to(torch.int32)
    assert torch.equal(unpack_bitmask(bitmask, 150), _allowed_ref(bitmask, 150))


@pytest.mark.parametrize("constraint, message", [
    (OutputConstraint("json_schema", '{"type": "foo"}'), 'invalid json_schema: Unsupported type "foo"'),
    (OutputConstraint("json_schema", "{not json"), "invalid json_schema: Failed to parse JSON"),
    (OutputConstraint("regex", "("), "invalid regex: Regex parsing error"),
    (OutputConstraint("choice", "[]"), "choice needs a list of non-empty strings"),
])
def test_invalid_constraints_name_the_problem(constraint, message):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(structured=constraint).validate(49152)
    assert str(exc.value).startswith(message) and exc.value.param == "structured_output"
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        SamplingParams(structured=DIGITS, ignore_eos=True).validate(49152)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(structured=DIGITS, min_tokens=2).validate(49152)


def _seqs(constraint, n=1):
    params = SamplingParams(structured=constraint, n=n)
    return [Sequence("r", i, [1, 2], params, 8)
            for i in range(n)]


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer.hf, tokenizer.vocab_size, tokenizer.eos_token_ids)


def test_compiled_once_per_constraint_and_requests_wait_for_it(compiler, tokenizer):
    seqs = _seqs(DIGITS, n=2)
    compiler.add(seqs)
    assert compiler.compile(OutputConstraint("regex", "[0-9]{2}")) is compiler.compile(DIGITS)
    wait([compiler.compile(DIGITS)])
    aborted = _seqs(DIGITS)
    aborted[0].finish_reason = "abort"
    compiler.add(aborted)
    assert compiler.ready() == [seqs] and not compiler.has_waiting()
    assert all(s.grammar is not None for s in seqs) and aborted[0].grammar is None
    assert reads_own_tokens(seqs[0])  # no launching ahead: the next mask needs this token


def test_masked_rows_allow_exactly_the_grammar_and_others_are_untouched(compiler, tokenizer):
    wait([compiler.compile(DIGITS)])
    plain = _seqs(None)[0]
    constrained = _seqs(DIGITS)
    compiler.add(constrained)
    compiler.ready()
    vocab = tokenizer.vocab_size
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    masked = mask_logits(logits, [plain, constrained[0]])
    assert torch.equal(masked[0], logits[0])
    allowed = masked[1] > float("-inf")
    texts = {tokenizer.decode([t]) for t in allowed.nonzero().flatten().tolist()}
    assert texts and all(t.isdigit() for t in texts) and "0" in texts
    assert torch.equal(masked[1][allowed], logits[1][allowed])
    # Advanced by its tokens, the matcher allows only EOS once the regex is complete.
    for token in tokenizer.encode("42", add_special_tokens=False):
        assert constrained[0].grammar.accept_token(token)
    allowed = mask_logits(logits[1:], constrained) > float("-inf")
    assert set(allowed[0].nonzero().flatten().tolist()) == set(tokenizer.eos_token_ids)


def test_choice_and_json_object_constraints_compile(compiler):
    for constraint in (OutputConstraint("choice", json.dumps(["yes", 'a "b"'])),
                       OutputConstraint("json_object"),
                       OutputConstraint("grammar", 'root ::= "a" | "b"')):
        assert compiler.compile(constraint).result() is not None  # raises if it failed
