"""Structured output: a request's output constrained to a JSON Schema, a regex, a list of
choices or a grammar, by masking the logits of every token the grammar does not allow.

spec.py: the constraint as plain data (it crosses to the core process) and its validation.
compiler.py: grammars compiled off the step loop, cached by constraint; requests wait for theirs.
bitmask.py: each step's allowed-token masks, filled on the host and applied to the logits.

The grammar engine is xgrammar, chosen over llguidance by measurement with the default model's
tokenizer (SmolLM2, 49,152 tokens; a 5-property schema with an enum, bounded integer and array):
a mask per token took 7.8 us mean / 108 us max with xgrammar against 72 us / 1,387 us with
llguidance, which computes masks lazily (compiling in 1 ms, where xgrammar takes 9 ms up front
and 0.06 ms from its cache). The mask is on the step's critical path, the compile is not.
"""
