"""The speed gate's interleaving and statistic, on a scripted clock (no real timing here)."""
from __future__ import annotations

import pytest

from tooling.speed import InterleavedRounds, RoundTimings, merge


class ScriptedClock:
    """Each call of a contender advances the clock by that contender's scripted duration."""

    def __init__(self, durations: dict[str, list[float]]):
        self.durations = {name: list(values) for name, values in durations.items()}
        self.now = 0.0
        self.order: list[str] = []

    def __call__(self) -> float:
        return self.now

    def contender(self, name: str):
        def call():
            self.order.append(name)
            self.now += self.durations[name].pop(0)
        return call


def test_rounds_rotate_the_call_order_and_drop_the_warmup():
    clock = ScriptedClock({"torch": [9.0, 2.0, 2.0, 2.0], "ort": [9.0, 1.0, 1.0, 1.0]})
    rounds = InterleavedRounds({n: clock.contender(n) for n in ("torch", "ort")}, warmup=1, clock=clock)
    rounds.run(4)
    assert clock.order == ["torch", "ort", "ort", "torch", "torch", "ort", "ort", "torch"]
    timings = rounds.timings()
    assert timings.seconds == {"torch": [2.0, 2.0, 2.0], "ort": [1.0, 1.0, 1.0]}
    assert timings.median_ratio("torch", "ort") == 2.0


def test_one_disturbed_round_cannot_move_the_median_ratio():
    # Round 3 hit a noisy neighbour on the deployed side only: its ratio collapses, the median stays.
    timings = RoundTimings({"torch": [2.0, 2.1, 2.0, 1.9, 2.0], "ort": [1.0, 1.0, 6.0, 1.0, 1.0]})
    assert timings.ratios("torch", "ort")[2] == pytest.approx(1 / 3)
    assert timings.median_ratio("torch", "ort") == pytest.approx(2.0)
    # The ratio of means, what separate tests compared, would have read a 1.2x speed-up.
    assert timings.mean_s("torch") / timings.mean_s("ort") == pytest.approx(1.0, abs=0.05)


def test_a_slow_spell_on_both_sides_keeps_the_ratio():
    timings = RoundTimings({"torch": [2.0, 8.0, 2.0], "ort": [1.0, 4.0, 1.0]})
    assert timings.ratios("torch", "ort") == [2.0, 2.0, 2.0]


def test_merge_keeps_every_round_of_every_block():
    first = RoundTimings({"torch": [2.0], "ort": [1.0]})
    second = RoundTimings({"torch": [3.0, 4.0], "ort": [1.5, 2.0]})
    merged = merge([first, second])
    assert merged.seconds == {"torch": [2.0, 3.0, 4.0], "ort": [1.0, 1.5, 2.0]}
    assert merged.rounds() == 3 and merged.min_s("ort") == 1.0 and merged.median_s("torch") == 3.0


def test_no_rounds_is_an_error_not_a_ratio():
    with pytest.raises(ValueError, match="no timed rounds"):
        RoundTimings({"torch": [], "ort": []}).median_ratio("torch", "ort")
