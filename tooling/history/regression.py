"""What changed since earlier runs of the same host class and versions.

- speed: a move of the speed-up by at least the minimum effect (a rank test alone flags a 0.5 %
  shift given enough rounds) that is significant both against the pooled per-round ratios of the
  earlier runs (Mann-Whitney U, scipy) and against the run-to-run spread of their medians (on a
  loaded host an unchanged setup's median drifts by several percent from run to run, which pooled
  rounds alone would flag); per cell and per backend over all its cells, with the run's tests
  sharing ``alpha`` (see ``_speed_changes``);
- parity drift: a worst difference that grew 10x or more over the largest of the last K runs, even
  while within tolerance (tiny differences below a thousandth of the tolerance are noise, not drift);
- accuracy: a metric that moved further than the model's agreement bound from the previous run;
- transitions against the previous run: newly failing, newly passing, a backend now unavailable.
A reused (cached) verdict repeats an earlier measurement: it is compared for transitions only, and
never pooled into a baseline, where it would count one measurement several times.
Improvements are reported too, but only regressions fail a run under ``--fail-on-regression``.
"""
from __future__ import annotations

import math
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
MIN_ROUNDS = 3
MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal sample is 0.6745 sigma
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
    """The last ``window`` earlier runs of the same host class and versions that ran any of this
    run's gates: a nightly's benchmark pass is compared with the last 7 benchmark passes, not with
    the parity passes between them, which hold none of its cells."""
    ids = [i for i in history.run_ids(host_class=run.host_class, versions=run.versions, before=run.started,
                                       limit=window + 1, holding={(c.model, c.gate) for c in run.cells})
           if i != run.run_id][:window]
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
        if measured:
            changes += _drift(cell, measured)
            changes += _accuracy(cell, measured[0], (agreement or {}).get(cell.model, {}))
    changes += _speed_changes(_speed_cells(run, earlier), min_effect, alpha)
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


def _log_median(samples: list) -> tuple[float, float, int] | None:
    """(log of the median ratio, the variance of that estimate, rounds) from one run's per-round
    ratios. The variance is the large-sample one of a median, pi/2 * sigma^2 / n, with sigma read
    robustly from the median absolute deviation: one stalled round must not make a run look noisy."""
    logs = [math.log(x) for x in samples if x is not None and x > 0]
    if len(logs) < MIN_ROUNDS:
        return None
    centre = statistics.median(logs)
    sigma = MAD_TO_SIGMA * statistics.median(abs(x - centre) for x in logs)
    return centre, math.pi / 2 * sigma ** 2 / len(logs), len(logs)


@dataclass(frozen=True)
class _SpeedCell:
    cell: CellRecord
    current: tuple[float, float, int]
    earlier: list[tuple[float, float, int]]  # one per earlier fresh run, newest first
    pooled: list[float]  # every earlier round, each measured once
    runs: list[int]  # which baseline run each of ``earlier`` came from


def _speed_cells(run: RunRecord, earlier: list[dict]) -> list[_SpeedCell]:
    out = []
    for cell in run.cells:
        if cell.figures.get("cached") or (current := _log_median(cell.series.get("ratio_samples") or [])) is None:
            continue
        found = [(i, cells[cell.key]) for i, cells in enumerate(earlier)
                 if cell.key in cells and not cells[cell.key].figures.get("cached")]
        measured = [(i, h.series.get("ratio_samples") or []) for i, h in found]
        measured = [(i, s, m) for i, s in measured if (m := _log_median(s)) is not None]
        if measured:
            out.append(_SpeedCell(cell, current, [m for _, _, m in measured],
                                  [x for _, s, _ in measured for x in s if x is not None and x > 0],
                                  [i for i, _, _ in measured]))
    return out


def between_run_variance(cells: list[_SpeedCell]) -> tuple[float, int]:
    """How much more a speed-up's per-run median moves between unchanged runs than its own rounds
    explain (load, frequency, memory placement): the excess variance of the log medians over their
    within-run variance, pooled over every speed cell of the run's earlier runs (the drift comes
    from the host, which all cells share), with its degrees of freedom. (0, 0) without two runs."""
    excess = df = 0.0
    for c in cells:
        if len(c.earlier) < 2:
            continue
        logs = [y for y, _, _ in c.earlier]
        excess += (len(logs) - 1) * (statistics.variance(logs) - statistics.fmean(v for _, v, _ in c.earlier))
        df += len(logs) - 1
    return (max(excess / df, 0.0), int(df)) if df else (0.0, 0)


@dataclass(frozen=True)
class _SpeedTest:
    """One speed cell against its baseline: the move of its median, and the evidence of both tests."""
    c: _SpeedCell
    before: float  # log of the earlier runs' typical median
    shift: float  # log(now / before)
    spread: float  # sd of one unchanged run's log median
    p_runs: float
    u_centred: float  # Mann-Whitney U - its mean under no shift (rounds now vs pooled rounds)
    u_variance: float
    p_rounds: float

    @property
    def effect(self) -> float:
        return math.expm1(self.shift)

    @property
    def text(self) -> str:
        return f"speed-up {math.exp(self.before):.2f}x -> {math.exp(self.before + self.shift):.2f}x ({self.effect:+.0%})"

    def evidence(self) -> str:
        return (f"between runs p={self.p_runs:.2g}, earlier medians spread ±{math.expm1(self.spread):.0%}; rounds: "
                f"Mann-Whitney U p={self.p_rounds:.2g}, {self.c.current[2]} vs {len(self.c.pooled)} from "
                f"{len(self.c.earlier)} run(s)")


def _speed_test(c: _SpeedCell, tau2: float, df: int) -> _SpeedTest:
    """(1) The rank test: do this run's rounds differ from the pooled rounds of the earlier runs
    (Mann-Whitney U)? Alone it flags every between-run drift of a loaded host once the baseline
    pools enough rounds. (2) The prediction test: does this run's median lie outside what unchanged
    runs' medians spread over (its within-run variance, the baseline mean's, and the between-run
    variance; Student t on the pooled degrees of freedom)?"""
    from scipy.stats import mannwhitneyu, t as student_t

    y0, v0, m = c.current
    n = len(c.earlier)
    before = statistics.fmean(y for y, _, _ in c.earlier)
    spread = math.sqrt(tau2 + statistics.fmean(v for _, v, _ in c.earlier))
    se = math.sqrt(tau2 + v0 + sum(tau2 + v for _, v, _ in c.earlier) / n ** 2)
    shift = y0 - before
    t = shift / se if se > 0 else math.copysign(math.inf, shift) if shift else 0.0
    p_runs = float(student_t.sf(abs(t), df))
    rounds = [x for x in c.cell.series["ratio_samples"] if x is not None and x > 0]
    u = mannwhitneyu(rounds, c.pooled, alternative="less" if shift < 0 else "greater")
    k = len(c.pooled)
    return _SpeedTest(c, before, shift, spread, p_runs, float(u.statistic) - m * k / 2,
                      m * k * (m + k + 1) / 12, float(u.pvalue))


def _backend_levels(tests: list[_SpeedTest]) -> tuple[float, list[float], float, int] | None:
    """A backend's level in each run: the mean over its speed cells of each cell's log median
    less that cell's mean over the earlier runs that have all of them. Returns (this run's level,
    the earlier runs' levels, the sum of their squares, degrees of freedom), or None with fewer than
    two such runs. The levels' spread is the run-to-run spread of the backend as a whole, measured
    where it is used: it holds the drift its cells share in a run (one thread pool, one process)."""
    common = set.intersection(*(set(t.c.runs) for t in tests))
    if len(common) < 2:
        return None
    by_run = [dict(zip(t.c.runs, (y for y, _, _ in t.c.earlier))) for t in tests]
    means = [statistics.fmean(ys[r] for r in common) for ys in by_run]
    earlier = [statistics.fmean(ys[r] - mu for ys, mu in zip(by_run, means)) for r in sorted(common)]
    now = statistics.fmean(t.c.current[0] - mu for t, mu in zip(tests, means))
    return now, earlier, sum(x * x for x in earlier), len(earlier) - 1


def _speed_changes(cells: list[_SpeedCell], min_effect: float, alpha: float) -> list[Change]:
    """p-values are one-sided, in the direction of the move: slowdowns (regressions, which fail a
    run under --fail-on-regression) and gains (changes) are separate families. Two families of
    tests, each at ``alpha`` shared among its members (Bonferroni: a run with
    thirteen speed cells tests each at alpha/13, or unchanged runs would flag one cell in every
    few runs), each needing both the rank test and the prediction test and the minimum effect:
    - a cell, against its own earlier runs;
    - a backend, all its speed cells of this run together: the rank tests stratified by cell (van
      Elteren), the prediction test on its level (``_backend_levels``), the effect the median of
      its cells' moves. A backend that got slower is slower in every case, and ten rounds of one
      case may not show it where fifty rounds of five do; its cells that moved by the minimum
      effect in its direction are marked.
    Both need two earlier runs, to know how far unchanged runs drift."""
    tau2, df = between_run_variance(cells)
    if not df:
        return []
    tests = [_speed_test(c, tau2, df) for c in cells]
    from scipy.stats import norm, t as student_t

    flagged: dict[tuple, str] = {}
    cell_alpha = alpha / len(tests)
    for test in tests:
        if abs(test.effect) >= min_effect and test.p_rounds < cell_alpha and test.p_runs < cell_alpha:
            flagged[test.c.cell.key] = f"{test.text}; {test.evidence()}; each of {len(tests)} cells at p<{cell_alpha:.1g}"
    by_backend: dict[str, list[_SpeedTest]] = {}
    for test in tests:
        by_backend.setdefault(test.c.cell.backend, []).append(test)
    levels = {b: lv for b, group in by_backend.items() if len(group) > 1 and (lv := _backend_levels(group))}
    level_df = sum(lv[3] for lv in levels.values())
    if not level_df:
        levels = {}
    level_var = sum(lv[2] for lv in levels.values()) / level_df if levels else 0.0
    backend_alpha = alpha / max(len(levels), 1)
    for backend, (now, earlier, _, _) in levels.items():
        group = by_backend[backend]
        # van Elteren: each cell's U weighted by 1 / (its rounds, now and pooled, + 1), the locally most powerful weights
        weights = [1 / (g.c.current[2] + len(g.c.pooled) + 1) for g in group]
        z_rounds = sum(w * g.u_centred for w, g in zip(weights, group)) / math.sqrt(
            sum(w * w * g.u_variance for w, g in zip(weights, group)))
        p_rounds = float(norm.sf(abs(z_rounds)))
        se = math.sqrt(level_var * (1 + 1 / len(earlier)))
        p_runs = float(student_t.sf(abs(now) / se, level_df)) if se > 0 else float(now == 0)
        effect = math.expm1(statistics.median(g.shift for g in group))
        if (abs(effect) < min_effect or p_rounds >= backend_alpha or p_runs >= backend_alpha
                or (z_rounds < 0) != (effect < 0) or (now < 0) != (effect < 0)):
            continue
        why = (f"{backend} {'fell' if effect < 0 else 'rose'} {effect:+.0%} over its {len(group)} speed cells "
               f"(between runs p={p_runs:.2g}, earlier levels spread ±{math.expm1(math.sqrt(level_var)):.0%}; "
               f"rounds: stratified Mann-Whitney U p={p_rounds:.2g}; each of {len(levels)} backends at "
               f"p<{backend_alpha:.1g})")
        for g in group:
            if (g.effect < 0) == (effect < 0) and abs(g.effect) >= min_effect:
                flagged.setdefault(g.c.cell.key, f"{g.text}; {why}")
    out = []
    for test in tests:
        message = flagged.get(test.c.cell.key)
        if message:
            slower = test.effect < 0
            out.append(_change(test.c.cell, "speed", slower, "▼" if slower else "▲", message))
    return out


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
