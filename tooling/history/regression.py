"""What changed since earlier runs of the same host class and versions.

- speed: the per-round speed-up ratios of a backend against the pooled ratios of the last K runs,
  Mann-Whitney U (scipy), flagged when significant *and* the median moved by at least the minimum
  effect (a rank test alone flags a 0.5 % shift given enough rounds);
- parity drift: a worst difference that grew 10x or more over the largest of the last K runs, even
  while within tolerance (tiny differences below a thousandth of the tolerance are noise, not drift);
- accuracy: a metric that moved further than the model's agreement bound from the previous run;
- transitions against the previous run: newly failing, newly passing, a backend now unavailable.
A reused (cached) verdict repeats an earlier measurement: it is compared for transitions only, and
never pooled into a baseline, where it would count one measurement several times.
Improvements are reported too, but only regressions fail a run under ``--fail-on-regression``.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

from tooling.history.store import CellRecord, History, RunRecord

DEFAULT_WINDOW = 7
DEFAULT_MIN_EFFECT = 0.05
DEFAULT_ALPHA = 0.01
DRIFT_FACTOR = 10.0
DRIFT_FLOOR_OF_TOLERANCE = 1e-3
ABSOLUTE_DRIFT_FLOOR = 1e-9
ACCURACY_GATES = ("accuracy", "accuracy-known-answer", "accuracy-oracle", "accuracy-agreement")


@dataclass(frozen=True)
class Change:
    kind: str  # speed, drift, accuracy, newly-failing, newly-passing, unavailable
    model: str
    gate: str
    case: str
    backend: str
    regression: bool
    mark: str  # the symbol the grid prefixes the cell with: "▼1.71x" is a speed-up that fell
    message: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model, self.gate, self.case, self.backend)

    def line(self) -> str:
        flag = "REGRESSION" if self.regression else "change"
        return f"  {flag:<10} {self.model} {self.gate} {self.case} {self.backend}: {self.message}"


@dataclass(frozen=True)
class Comparison:
    baseline: list[RunRecord]  # newest first
    changes: list[Change]

    @property
    def since(self) -> RunRecord | None:
        return self.baseline[0] if self.baseline else None

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    LEGEND = ("marks against earlier runs: ▼/▲ speed-up fell/rose, ↑ parity drift, ≠ metric moved, "
              "✗ newly failing, ✓ newly passing, ⊘ now unavailable")

    def marks(self) -> dict[tuple[str, str, str, str], str]:
        marks: dict[tuple[str, str, str, str], str] = {}
        for change in self.changes:
            if change.mark not in marks.get(change.key, ""):
                marks[change.key] = marks.get(change.key, "") + change.mark
        return marks

    def render(self) -> list[str]:
        if not self.baseline:
            return ["no earlier run of this host class and versions in the history: nothing to compare with"]
        head = (f"{len(self.regressions)} regression(s), {len(self.changes) - len(self.regressions)} other change(s) "
                f"against the last {len(self.baseline)} run(s) of this host class and versions")
        return [head] + [c.line() for c in sorted(self.changes, key=lambda c: (not c.regression, c.key))]


def baseline_runs(history: History, run: RunRecord, window: int = DEFAULT_WINDOW) -> list[RunRecord]:
    ids = [i for i in history.run_ids(host_class=run.host_class, versions=run.versions, before=run.started,
                                       limit=window + 1) if i != run.run_id][:window]
    return list(history.runs(ids))


def compare(run: RunRecord, baseline: list[RunRecord], *, agreement: Mapping[str, Mapping[str, float]] | None = None,
            min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA) -> Comparison:
    """``baseline``: earlier comparable runs, newest first; ``agreement``: per model, each metric's
    agreement bound (how far a metric may move and still be the same)."""
    if not baseline:
        return Comparison([], [])
    earlier = [{c.key: c for c in b.cells} for b in baseline]
    changes: list[Change] = []
    for cell in run.cells:
        history = [cells[cell.key] for cells in earlier if cell.key in cells]
        if not history:
            continue
        changes += _transition(cell, history[0])  # the latest earlier run that had this cell
        if cell.figures.get("cached"):
            continue  # a reused verdict measured nothing new
        measured = [h for h in history if not h.figures.get("cached")]  # each measurement once
        if not measured:
            continue
        history = measured
        changes += _speed(cell, history, min_effect, alpha)
        changes += _drift(cell, history)
        changes += _accuracy(cell, history[0], (agreement or {}).get(cell.model, {}))
    return Comparison(baseline, changes)


def _change(cell: CellRecord, kind: str, regression: bool, mark: str, message: str) -> Change:
    return Change(kind, cell.model, cell.gate, cell.case, cell.backend, regression, mark, message)


def _transition(cell: CellRecord, before: CellRecord | None) -> list[Change]:
    if before is None or before.outcome == cell.outcome:
        return []
    if cell.outcome == "failed" and before.outcome != "failed":
        return [_change(cell, "newly-failing", True, "✗", f"newly failing (was {before.outcome}): {cell.detail[:160]}")]
    if cell.outcome == "passed" and before.outcome == "failed":
        return [_change(cell, "newly-passing", False, "✓", "newly passing (failed before)")]
    if cell.outcome == "skipped" and before.outcome != "skipped" and " unavailable" in cell.detail:
        return [_change(cell, "unavailable", True, "⊘", f"ran before ({before.outcome}), now: {cell.detail[:160]}")]
    return []


def _speed(cell: CellRecord, history: list[CellRecord], min_effect: float, alpha: float) -> list[Change]:
    current = cell.series.get("ratio_samples")
    pooled = [x for h in history for x in h.series.get("ratio_samples", ()) if x is not None]
    if not current or len(pooled) < 3 or len(current) < 3:
        return []
    from scipy.stats import mannwhitneyu

    before, now = statistics.median(pooled), statistics.median(current)
    effect = now / before - 1.0
    p = float(mannwhitneyu(current, pooled, alternative="two-sided").pvalue)
    if abs(effect) < min_effect or p >= alpha:
        return []
    slower = bool(effect < 0)
    message = (f"speed-up {before:.2f}x -> {now:.2f}x ({effect:+.0%}, Mann-Whitney U p={p:.2g}, "
               f"{len(current)} rounds vs {len(pooled)} from {len(history)} run(s))")
    return [_change(cell, "speed", slower, "▼" if slower else "▲", message)]


def _worst_figures(cell: CellRecord) -> dict[str, tuple[float, float | None]]:
    """output name -> (worst difference, its absolute tolerance if recorded): per output where the
    gate recorded outputs, else the row's single worst under the name ``""``."""
    per_output = {name.removeprefix("outputs.").removesuffix(".max_abs"): value
                  for name, value in cell.figures.items()
                  if name.startswith("outputs.") and name.endswith(".max_abs") and value is not None}
    if per_output:
        return {o: (v, cell.figures.get(f"outputs.{o}.atol")) for o, v in per_output.items()}
    worst = cell.figures.get("worst_max_abs")
    return {"": (worst, None)} if worst is not None else {}


def _drift(cell: CellRecord, history: list[CellRecord]) -> list[Change]:
    changes = []
    earlier = [_worst_figures(h) for h in history]
    for output, (now, atol) in _worst_figures(cell).items():
        before = [e[output][0] for e in earlier if output in e]
        if not before:
            continue
        floor = max(ABSOLUTE_DRIFT_FLOOR, (atol or 0.0) * DRIFT_FLOOR_OF_TOLERANCE)
        reference = max(max(before), floor)
        if now >= DRIFT_FACTOR * reference:
            within = f", tolerance {atol:.1e}" if atol else ""
            grew = f"grew {now / max(before):.3g}x" if max(before) > 0 else "grew from exactly 0"
            of_output = f" of {output}" if output else ""
            changes.append(_change(cell, "drift", True, "↑", f"worst |difference|{of_output} {grew}: "
                                                                f"{max(before):.2e} -> {now:.2e}{within}"))
    return changes


def _accuracy(cell: CellRecord, before: CellRecord, bounds: Mapping[str, float]) -> list[Change]:
    if cell.gate not in ACCURACY_GATES:
        return []
    changes = []
    for name, bound in bounds.items():
        now, was = cell.figures.get(f"metrics.{name}"), before.figures.get(f"metrics.{name}")
        if now is None or was is None or abs(now - was) <= bound:
            continue
        changes.append(_change(cell, "accuracy", True, "≠",
                               f"{name} moved {was:.6g} -> {now:.6g} ({now - was:+.3g}; agreement bound {bound:g})"))
    return changes
