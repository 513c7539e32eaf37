"""The caller's side of the engine's outputs: token ids in, text out, stop strings applied.

The engine core sends token ids only; detokenizing them is the front end's work (vLLM v1
does the same), so it runs beside the engine's steps instead of between them. A stop string
can end a sequence the core still runs: the processor cuts the text there, drops the tokens
after it (the core drew them before it knew) and reports which sequences the caller must
stop in the core (`EngineCore.stop`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from wattserve.engine.detokenizer import IncrementalDetokenizer
from wattserve.engine.request import FinishReason, RequestOutput, SamplingParams
from wattserve.engine.tokenizer import Tokenizer


@dataclass
class _Choice:
    detokenizer: IncrementalDetokenizer
    num_output_tokens: int = 0
    finished: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._requests: dict[str, list[_Choice]] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._requests[request_id] = [
            _Choice(IncrementalDetokenizer(self._tokenizer.hf, prompt_token_ids, params.stop))
            for _ in range(params.n)
        ]

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def process_all(self, outputs: list[RequestOutput],
                    stop: Callable[[str, list[int]], None]) -> list[RequestOutput]:
        """A step's outputs with their text; `stop(request_id, indices)` tells the core which
        sequences stop strings ended."""
        with_text = []
        for out in outputs:
            processed, stopped = self.process(out)
            if stopped:
                stop(out.request_id, stopped)
            if processed is not None:
                with_text.append(processed)
        return with_text

    def process(self, out: RequestOutput) -> tuple[RequestOutput | None, list[int]]:
        """The output with its text, None if nothing of it is left to hand out (its request
        ended here already); and the indices of the sequences a stop string ended just now."""
        choices = self._requests.get(out.request_id)
        if choices is None:
            return None, []
        outputs, stopped = [], []
        for seq in out.outputs:
            choice = choices[seq.index]
            if choice.finished:
                continue  # drawn before the core learned of the stop string
            detokenizer = choice.detokenizer
            taken = 0
            for token in seq.token_ids:
                detokenizer.add(token)
                taken += 1
                if detokenizer.stopped_by is not None:
                    break
            choice.num_output_tokens += taken
            reason = seq.finish_reason
            if detokenizer.stopped_by is not None:
                if reason is None:
                    stopped.append(seq.index)
                reason = FinishReason.STOP
            choice.finished = reason is not None
            outputs.append(replace(
                seq, token_ids=seq.token_ids[:taken],
                logprobs=None if seq.logprobs is None else seq.logprobs[:taken],
                finish_reason=reason, num_output_tokens=choice.num_output_tokens,
                text=detokenizer.take(final=choice.finished)))
        finished = all(c.finished for c in choices)
        if finished:
            del self._requests[out.request_id]
        elif not outputs:
            return None, stopped
        return replace(out, outputs=outputs, finished=finished), stopped
