"""Interleaved timing of several sessions on the same inputs, and the robust statistic the CPU
speed gate reads.

Timing each backend in its own test, minutes apart, lets a noisy neighbour land on one side of a
ratio only (a 1.31x against a 1.3 floor one run, a pass the next). Here every round calls each
contender once, in an order that rotates from round to round, so a slow spell on a shared runner
hits all of them alike; the gate reads the median of the per-round ratios, which one disturbed
round cannot move.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass
class InterleavedRounds:
    """A callable that runs one round (each contender once, rotated order) and keeps its timings.

    Handed to ``benchmark.pedantic`` so pytest-benchmark records the rounds; ``warmup`` rounds are
    timed but left out of every statistic.
    """

    calls: Mapping[str, Callable[[], object]]
    warmup: int = 1
    clock: Callable[[], float] = time.perf_counter
    seconds: dict[str, list[float]] = field(default_factory=dict)
    _rounds_run: int = 0

    def __post_init__(self):
        self.seconds = {name: [] for name in self.calls}

    def __call__(self) -> None:
        names = list(self.calls)
        shift = self._rounds_run % len(names)
        for name in names[shift:] + names[:shift]:
            start = self.clock()
            self.calls[name]()
            self.seconds[name].append(self.clock() - start)
        self._rounds_run += 1

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self()

    def timings(self) -> "RoundTimings":
        return RoundTimings({name: times[self.warmup:] for name, times in self.seconds.items()})


@dataclass(frozen=True)
class RoundTimings:
    """Seconds per call, one entry per measured round, for each contender."""

    seconds: dict[str, list[float]]

    def rounds(self) -> int:
        return min((len(t) for t in self.seconds.values()), default=0)

    def ratios(self, reference: str, contender: str) -> list[float]:
        """Per round, how many times faster ``contender`` ran than ``reference`` in that round."""
        return [r / c for r, c in zip(self.seconds[reference], self.seconds[contender]) if c > 0]

    def median_ratio(self, reference: str, contender: str) -> float:
        ratios = self.ratios(reference, contender)
        if not ratios:
            raise ValueError(f"no timed rounds for {reference} vs {contender}")
        return statistics.median(ratios)

    def mean_s(self, name: str) -> float:
        return statistics.fmean(self.seconds[name])

    def median_s(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def min_s(self, name: str) -> float:
        return min(self.seconds[name])


def merge(blocks: list[RoundTimings]) -> RoundTimings:
    """All rounds of several measurement blocks, for the figures a run reports."""
    names = blocks[0].seconds if blocks else {}
    return RoundTimings({name: [t for b in blocks for t in b.seconds[name]] for name in names})
