"""Latency SLOs as DistServe defines them (Zhong et al., OSDI 2024).

A request's time to first token (TTFT) runs from its arrival to its first output token; its
time per output token (TPOT) is the rest of its latency spread over the rest of its tokens,
(e2e - TTFT) / (output tokens - 1). It meets its SLO when both are within their bounds. A
single-token answer has no TPOT and meets that half trivially; an SLO that leaves a bound
unset meets that half trivially too. Attainment is the fraction of requests meeting their SLO;
goodput counts only those requests (and their output tokens) per second.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def check(self, ttft: float, tpot: float | None) -> SLOResult:
        return SLOResult(ttft_met=self.ttft_s is None or ttft <= self.ttft_s,
                         tpot_met=self.tpot_s is None or tpot is None or tpot <= self.tpot_s)


@dataclass(frozen=True)
class SLOResult:
    ttft_met: bool
    tpot_met: bool

    @property
    def met(self) -> bool:
        return self.ttft_met and self.tpot_met
