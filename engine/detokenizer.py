"""Incremental detokenization with stop strings.

Text is produced by decoding a short window of tokens and taking what the newest token added,
so cost per token stays constant. A window whose text ends in U+FFFD is an incomplete UTF-8
character (a multi-byte character split over tokens): nothing is emitted until it completes.
Text that could be the start of a stop string is held back until it is known not to be one.
"""
from __future__ import annotations

# Prompt tokens decoded as left context, so the first output token gets its leading space
# right in tokenizers (SentencePiece) that drop it at the start of a string.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self._tok = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # output text so far, cut at a stop string if one matched
        self._emitted = 0
        self._stop = [s for s in stop if s]
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> None:
        """Append one output token; sets `stopped_by` when a stop string appears."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return
        start = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._check_stop(start)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _check_stop(self, new_from: int) -> None:
        if not self._stop or self.stopped_by:
            return
        longest = max(len(s) for s in self._stop)
        window = max(0, new_from - longest + 1)
        hits = [(self.text.find(s, window), s) for s in self._stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            idx, s = min(hits)
            self.text = self.text[:idx]
            self.stopped_by = s

    def take(self, final: bool) -> str:
        """Text not yet handed out; unless final, keep back a tail that may begin a stop string."""
        end = len(self.text) if final or self.stopped_by else len(self.text) - self._held_back()
        end = max(end, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        for n in range(min(len(self.text), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
