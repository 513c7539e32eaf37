"""Sums over the last N seconds, for goodput, SLO attainment and energy per token.

The engine thread adds and the /metrics scrape reads, so the buckets sit behind one lock;
it is held for a few additions, once per step or finished request, never per token.
"""
from __future__ import annotations

import threading
from collections import deque


class SlidingWindow:
    def __init__(self, span_s: float, width: int, now: float):
        """`width` quantities, summed in one-second buckets over the last `span_s` seconds;
        `now` starts the clock, so a young server's rates are over its lifetime so far."""
        self.span_s = span_s
        self._width = width
        self._started = now
        self._buckets: deque[list[float]] = deque()  # [second, sum, sum, ...]
        self._lock = threading.Lock()

    def add(self, now: float, *values: float) -> None:
        second = int(now)
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != second:
                self._buckets.append([second] + [0.0] * self._width)
            bucket = self._buckets[-1]
            for i, value in enumerate(values, 1):
                bucket[i] += value
            self._trim(now)

    def totals(self, now: float) -> tuple[float, list[float]]:
        """(seconds the sums cover, the sums)."""
        with self._lock:
            self._trim(now)
            sums = [sum(b[i] for b in self._buckets) for i in range(1, self._width + 1)]
        return min(self.span_s, now - self._started), sums

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + 1 <= now - self.span_s:
            self._buckets.popleft()
