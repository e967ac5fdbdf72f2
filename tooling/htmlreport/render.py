"""``python -m tooling report``: the run history as one self-contained HTML page (plots and
pictures embedded as data URIs: it opens offline, from a CI artifact or a mail attachment) and a
short markdown summary for a CI job summary.

What a maintainer sees first: the last session (every pass of the last nightly or CI invocation,
which share a ``ZOO_SESSION_ID``; a run without one is a session alone), its failures and
regressions by name, then the grid, each cell from the pass that ran it, changed cells marked. Below, per model: trends over runs, roofline and error quantiles of the
last session, pictures of the largest disagreements and the worst samples of each accuracy pass.
"""
from __future__ import annotations

import base64
import html
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tooling.history.regression import Comparison, baseline_runs, compare
from tooling.history.store import CellRecord, History, HistoryError, RunRecord
from tooling.htmlreport import plots
from tooling.report import BACKEND_ORDER, LEGEND as CELL_LEGEND

DEFAULT_RUNS = 30
PARITY_GATES = ("golden", "port-vs-upstream", "onnx-vs-torch", "deployed-vs-onnx", "decoded-vs-torch", "chain-vs-torch")
ACCURACY_GATES = ("accuracy", "accuracy-known-answer", "accuracy-oracle", "accuracy-agreement")
WORST_SAMPLES = 8


@dataclass
class Rendered:
    html: Path
    markdown: Path
    runs: int
    images: int


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _short(label: str) -> str:
    return time.strftime("%m-%d %H:%M", time.strptime(label[:16], "%Y-%m-%d %H:%M"))


def _targets(model: str) -> tuple[dict[str, float], dict[str, float]]:
    """(metric -> the guide's target, metric -> agreement bound) from the model's yaml, if it has one."""
    try:
        from tooling.baseline import load_model_spec

        accuracy = load_model_spec(model).accuracy
    except Exception:  # noqa: BLE001 - a model no yaml describes here (a merged history) has no lines to draw
        return {}, {}
    if accuracy is None:
        return {}, {}
    targets = {accuracy.metric: accuracy.target, **dict(accuracy.extra_targets or {})}
    return targets, dict(accuracy.agreement or {})


class Report:
    def __init__(self, history: History, runs: int = DEFAULT_RUNS):
        ids = history.run_ids(limit=1)
        if not ids:
            raise HistoryError(f"{history.path}: holds no run yet")
        self.latest = history.load_run(ids[0], pictures=False)
        # The last session: every pass of the invocation the newest run belongs to (a nightly's
        # parity/accuracy pass, then its benchmark pass), oldest first; a run without one is alone.
        self.session = [self.latest if i == self.latest.run_id else history.load_run(i, pictures=False)
                        for i in history.session_run_ids(self.latest.run_id)]
        self.cells, self.cell_pass = session_cells(self.session)
        same_class = history.run_ids(host_class=self.latest.host_class, limit=runs)
        self.runs = list(reversed([history.load_run(i, pictures=False) for i in same_class]))  # oldest first
        self.runs[-1] = self.latest
        # One point per session on the trends (a nightly's passes are one night, not two).
        points: dict[str, list[RunRecord]] = {}
        for run in self.runs:
            points.setdefault(run.session, []).append(run)
        self.points = list(points.values())
        self.labels = [_short(p[0].label) for p in self.points]
        self.last = "last session" if len(self.session) > 1 else "last run"
        self.models = sorted({c.model for r in self.runs + self.session for c in r.cells})
        self.bounds = {m: _targets(m) for m in self.models}
        # Each pass against earlier runs as the plugin compared it when it ran (a benchmark pass
        # with earlier benchmark cells, a parity pass with earlier parity cells), never pooled.
        agreement = {m: b[1] for m, b in self.bounds.items()}
        self.comparison = session_comparison(
            [compare(run, baseline_runs(history, run), agreement=agreement) for run in self.session], self.session)
        # The newest run holding pictures and samples per model (a benchmark pass records none).
        recent = history.run_ids(limit=runs)
        self.pictures: dict[str, list[tuple]] = {}
        self.samples: dict[str, tuple[str, list[tuple]]] = {}
        for model in self.models:
            run_id = history.newest_with("pictures", model, recent)
            if run_id:
                self.pictures[model] = [tuple(r) for r in history.db.execute(
                    "SELECT model, gate, backend, caption, png FROM pictures WHERE run_id = ? AND model = ?", (run_id, model))]
            run_id = history.newest_with("samples", model, recent)
            if run_id:
                self.samples[model] = (history.load_run(run_id, pictures=False).label, [tuple(r) for r in history.db.execute(
                    "SELECT model, gate, backend, sample, name, value FROM samples WHERE run_id = ? AND model = ?",
                    (run_id, model))])
        self.images = 0

    # -- pieces ----------------------------------------------------------------------------------
    def img(self, png: bytes, alt: str) -> str:
        self.images += 1
        return f'<img src="{data_uri(png)}" alt="{_e(alt)}">'

    def _series(self, model: str, pick) -> dict[str, list[float | None]]:
        """name -> one value per session (the largest of its passes'), from ``pick(cell) -> {series name: value}``."""
        out: dict[str, list[float | None]] = {}
        for i, point in enumerate(self.points):
            for cell in (c for run in point for c in run.cells):
                if cell.model != model:
                    continue
                for name, value in pick(cell).items():
                    if value is None:
                        continue
                    values = out.setdefault(name, [None] * len(self.points))
                    values[i] = value if values[i] is None else max(values[i], value)
        return out

    def verdict(self) -> tuple[str, dict[str, int], list[CellRecord]]:
        """The session's verdict over every cell of every pass, its outcome counts and its failures."""
        counts: dict[str, int] = defaultdict(int)
        for cell in self.cells:
            counts[cell.outcome] += 1
        failed = [c for c in self.cells if c.outcome == "failed"]
        return ("FAILED" if failed else "REGRESSED" if self.comparison.regressions else "passed"), counts, failed

    def session_line(self) -> str:
        if len(self.session) == 1:
            return f"last run {self.latest.label}"
        return f"last session {self.latest.session_id}: {len(self.session)} passes, the last {self.latest.label}"

    def pass_lines(self) -> list[str]:
        """One line per pass of the session (none for a run alone): when, what it ran, how it ended."""
        if len(self.session) == 1:
            return []
        lines = []
        for i, run in enumerate(self.session):
            cells = [c for c in self.cells if self.cell_pass[c.key] == i]
            counts = {o: sum(1 for c in cells if c.outcome == o) for o in ("passed", "failed", "skipped")}
            gates = list(dict.fromkeys(c.gate for c in cells))
            shown = ", ".join(gates[:6]) + (f" and {len(gates) - 6} more" if len(gates) > 6 else "")
            lines.append(f"{run.label}: {len(cells)} cell(s) on the grid, {counts['passed']} passed, {counts['failed']} "
                         f"failed, {counts['skipped']} skipped" + (f" ({shown})" if gates else
                                                                   " (every cell it ran was run again later)")
                         + (f"; exit status {run.exit_status}" if run.exit_status else ""))
        return lines

    def passes(self) -> str:
        lines = self.pass_lines()
        return ('<ol class="passes">' + "".join(f"<li><b>pass {i}</b> {_e(line)}</li>" for i, line in enumerate(lines, 1))
                + "</ol>") if lines else ""

    def plotted(self) -> str:
        if len(self.points) == len(self.runs):
            return f"{len(self.runs)} run(s)"
        return f"{len(self.points)} session(s) ({len(self.runs)} runs)"

    def first_screen(self) -> str:
        run = self.latest
        env = run.environment
        verdict, counts, failed = self.verdict()
        regressions = self.comparison.regressions
        parts = [f'<header class="{"passed" if verdict == "passed" else "failed"}"><h1>zoo-conformance: {_e(verdict)}</h1>',
                 f"<p>{_e(self.session_line())} on <b>{_e(env.get('host', '?'))}</b> "
                 f"({_e(run.host_class)}; {_e(', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items()))})</p>",
                 f"<p>{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
                 f"{' over its passes' if len(self.session) > 1 else ''}; "
                 f"{len(regressions)} regression(s) against earlier runs; {self.plotted()} of this host class "
                 f"plotted</p>{self.passes()}</header>"]
        if failed:
            parts.append(f'<section class="alert" id="failures"><h2>{len(failed)} failing</h2><ul>')
            parts += [f"<li><b>{_e(c.model)} {_e(c.gate)} {_e(c.backend)}</b> {_e(c.case)}: {_e(c.detail)}</li>"
                      for c in failed]
            parts.append("</ul></section>")
        since = self.comparison.since
        against = " (each pass against earlier runs of its kind)" if len(self.session) > 1 and since else ""
        parts.append(f'<section id="changes"><h2>changes since {_e(since.label) if since else "(no earlier run)"}'
                     f'{against}</h2>')
        if self.comparison.changes:
            parts.append("<ul>" + "".join(
                f'<li class="{"regression" if c.regression else "change"}">{_e(c.mark)} <b>{_e(c.model)} {_e(c.gate)} '
                f"{_e(c.backend)}</b> {_e(c.case)}: {_e(c.message)}</li>"
                for c in sorted(self.comparison.changes, key=lambda c: (not c.regression, c.key))) + "</ul>")
        else:
            parts.append("<p>none</p>" if since else
                         "<p>no earlier run of this host class and versions to compare with</p>")
        parts.append("</section>")
        return "\n".join(parts)

    def overview(self) -> str:
        marks = self.comparison.marks()
        several = len(self.session) > 1
        title = "the last session's grid, each cell from the pass that ran it" if several else "the last run's grid"
        parts = [f'<section id="overview"><h2>overview: {title}</h2>']
        for model in self.models:
            cells = [c for c in self.cells if c.model == model]
            if not cells:
                continue
            met = list(dict.fromkeys(c.backend for c in cells))
            backends = sorted(met, key=lambda b: (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), b))
            rows = sorted({(c.gate, c.case) for c in cells})
            by_key = {(c.gate, c.case, c.backend): c for c in cells}
            parts.append(f'<h3><a href="#model-{_e(model)}">{_e(model)}</a></h3><table class="grid"><tr>'
                         f'{"<th>pass</th>" if several else ""}<th>gate</th>'
                         f'<th>case</th>{"".join(f"<th>{_e(b)}</th>" for b in backends)}</tr>')
            for gate, case in rows:
                tds = []
                for backend in backends:
                    cell = by_key.get((gate, case, backend))
                    if cell is None:
                        tds.append('<td class="none">.</td>')
                        continue
                    mark = marks.get(cell.key, "")
                    text = cell.text or {"passed": "ok", "skipped": "skip", "failed": "FAIL"}[cell.outcome]
                    title = cell.detail or ""
                    if several:
                        title = f"pass {self.cell_pass[cell.key] + 1}" + (f": {title}" if title else "")
                    tds.append(f'<td class="{cell.outcome}{" changed" if mark else ""}" title="{_e(title)}">'
                               f"{_e(mark)}{_e(text)}</td>")
                from_pass = "".join(f"<td>{_e(p)}</td>" for p in [",".join(sorted(
                    {str(self.cell_pass[(model, gate, case, b)] + 1) for b in backends if (gate, case, b) in by_key}))]
                    if several)
                parts.append(f"<tr>{from_pass}<td>{_e(gate)}</td><td>{_e(case)}</td>{''.join(tds)}</tr>")
            parts.append("</table>")
        parts.append(f'<p class="legend">{_e(CELL_LEGEND)}<br>{_e(Comparison.LEGEND)}</p></section>')
        return "\n".join(parts)

    def model_section(self, model: str) -> str:
        targets, _ = self.bounds[model]
        parts = [f'<section class="model" id="model-{_e(model)}"><h2>{_e(model)}</h2><div class="plots">']
        speed = self._series(model, lambda c: {f"{c.case} {c.backend}": c.figures.get("speedup")}
                             if c.gate == "cpu-speedup" else {})
        floors = {f"floor {v:g}x": v for c in self.cells if c.model == model and (v := c.figures.get("floor"))}
        if speed:
            parts.append(self.img(plots.trend(f"{model}: speed-up over torch eager", "x torch eager", self.labels, speed,
                                              lines=floors), f"{model} speed-up trend"))
        rate = self._series(model, lambda c: {f"{c.case} {c.backend}": c.figures.get("throughput.rate")}
                            if "throughput.rate" in c.figures else {})
        if rate:
            parts.append(self.img(plots.trend(f"{model}: rate", "items/s", self.labels, rate), f"{model} rate trend"))
        parity, tolerance = self._parity_series(model)
        if parity:
            parts.append(self.img(plots.trend(f"{model}: worst |difference| per output (dashed: tolerance)",
                                              "max |difference|", self.labels, parity, log=True, series_lines=tolerance),
                                  f"{model} parity trend"))
        recorded = sorted({n.removeprefix("metrics.") for r in self.runs for c in r.cells if c.model == model
                           for n in c.figures if n.startswith("metrics.")})
        gated = set(targets) | set(self.bounds[model][1])  # the guide's targets and the agreement bounds
        for metric in [m for m in recorded if m in gated] if gated else recorded:
            values = self._series(model, lambda c: {f"{c.gate} {c.backend}": c.figures.get(f"metrics.{metric}")}
                                  if c.gate in ACCURACY_GATES else {})
            if not values:
                continue
            # The guide's target is about the guide's data: drawn only where a staged accuracy pass
            # is plotted; next to the agreement gate's calibrated sets it reads as a verdict it is not.
            staged = any(name.split(" ", 1)[0] == "accuracy" for name in values)
            lines = {f"guide's target {targets[metric]:g}": targets[metric]} if metric in targets and staged else {}
            title = f"{model}: {metric}" + ("" if staged or metric not in targets else
                                           " (no staged set: the guide's target is for its data)")
            parts.append(self.img(plots.trend(title, metric, self.labels, values, lines=lines), f"{model} {metric} trend"))
        bars = {f"{c.case} {c.backend}": (c.figures.get("throughput.achieved_gflops"), c.figures.get("throughput.peak_gflops"))
                for c in self.cells if c.model == model and c.figures.get("throughput.achieved_gflops")}
        if bars:
            parts.append(self.img(plots.roofline_bars(f"{model}: roofline ({self.last})", bars), f"{model} roofline"))
        quantiles = self._quantiles(model)
        if quantiles:
            parts.append(self.img(plots.quantile_bars(f"{model}: error quantiles per output ({self.last}, worst case)",
                                                      quantiles), f"{model} error quantiles"))
        parts.append("</div>")
        parts.append(self._pictures(model))
        parts.append(self._worst_samples(model))
        parts.append("</section>")
        return "\n".join(parts)

    def _parity_series(self, model: str) -> tuple[dict, dict]:
        tolerance: dict[str, float] = {}

        def pick(cell: CellRecord) -> dict[str, float | None]:
            if cell.gate not in PARITY_GATES:
                return {}
            out = {}
            for name, value in cell.figures.items():
                if name.startswith("outputs.") and name.endswith(".max_abs"):
                    output = name[len("outputs."):-len(".max_abs")]
                    label = f"{cell.gate} {cell.backend}: {output}"
                    out[label] = value
                    atol = cell.figures.get(f"outputs.{output}.atol")
                    if atol:
                        tolerance[label] = min(tolerance.get(label, atol), atol)
            return out

        return self._series(model, pick), tolerance

    def _quantiles(self, model: str) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for cell in self.cells:
            if cell.model != model or cell.gate not in PARITY_GATES:
                continue
            for name in cell.figures:
                if name.startswith("outputs.") and name.endswith(".max_abs"):
                    output = name[len("outputs."):-len(".max_abs")]
                    key = f"{cell.backend}: {output}"
                    figures = {s: cell.figures.get(f"outputs.{output}.{s}") for s in ("mean_abs", "p99_abs", "max_abs", "atol")}
                    if key not in out or (figures["max_abs"] or 0) > (out[key]["max_abs"] or 0):
                        out[key] = figures
        return out

    def _pictures(self, model: str) -> str:
        pictures = self.pictures.get(model)
        if not pictures:
            return ('<p class="note">no disagreement pictures recorded for this model yet (the agreement gate draws '
                    'them for slices that know how)</p>')
        parts = ["<h3>largest disagreements</h3><div class=\"pictures\">"]
        for _, gate, backend, caption, png in pictures:
            parts.append(f"<figure>{self.img(png, f'{model} {gate} {backend} {caption}')}"
                         f"<figcaption>{_e(gate)} on {_e(backend)}: {_e(caption)}</figcaption></figure>")
        parts.append("</div>")
        return "\n".join(parts)

    def _worst_samples(self, model: str) -> str:
        found = self.samples.get(model)
        if not found:
            return ""
        label, samples = found
        by_pass: dict[tuple[str, str, str], list[tuple[str, float]]] = defaultdict(list)
        for _, gate, backend, sample, name, value in samples:
            if value is not None:
                by_pass[(gate, backend, name)].append((sample, value))
        parts = [f"<h3>samples with the largest figures (run {_e(label)})</h3><table class=\"samples\">"
                 "<tr><th>pass</th><th>figure</th><th>largest first</th></tr>"]
        for (gate, backend, name), values in sorted(by_pass.items()):
            if len(values) > 1 and len({v for _, v in values}) == 1:
                continue  # the same for every sample (a frame count): ranks nothing
            worst = sorted(values, key=lambda sv: -sv[1])[:WORST_SAMPLES]
            parts.append(f"<tr><td>{_e(gate)} on {_e(backend)}</td><td>{_e(name)}</td><td>"
                         + ", ".join(f"<b>{_e(s)}</b> {v:.4g}" for s, v in worst) + "</td></tr>")
        parts.append("</table>")
        return "\n".join(parts)

    # -- whole documents -------------------------------------------------------------------------
    def html(self) -> str:
        nav = " · ".join(f'<a href="#model-{_e(m)}">{_e(m)}</a>' for m in self.models)
        body = [self.first_screen(), f'<nav>models: {nav}</nav>', self.overview()]
        body += [self.model_section(m) for m in self.models]
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>zoo-conformance report"
                f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def markdown(self) -> str:
        run = self.latest
        verdict, counts, failed = self.verdict()
        lines = [f"## zoo-conformance: {verdict}",
                 "", f"{self.session_line()[0].upper()}{self.session_line()[1:]} on {run.environment.get('host', '?')}: "
                 f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped.", ""]
        if len(self.session) > 1:
            lines += [f"- pass {i} {line}" for i, line in enumerate(self.pass_lines(), 1)] + [""]
        if failed:
            lines += ["### Failing", ""] + [f"- **{c.model} {c.gate} {c.backend}** `{c.case}`: {c.detail}" for c in failed] + [""]
        since = self.comparison.since
        lines += [f"### Changes since {since.label if since else '(no earlier run)'}", ""]
        lines += [f"- {'**REGRESSION** ' if c.regression else ''}{c.mark} {c.model} {c.gate} {c.backend} `{c.case}`: {c.message}"
                  for c in self.comparison.changes] or ["- none"]
        return "\n".join(lines) + "\n"


def session_cells(session: list[RunRecord]) -> tuple[list[CellRecord], dict[tuple, int]]:
    """The grid of a session: per cell, the pass that ran it (passed or failed) over one that only
    skipped it, and the later of two that both did; with the index of the pass each cell is from."""
    chosen: dict[tuple, tuple[CellRecord, int]] = {}
    for index, run in enumerate(session):
        for cell in run.cells:
            held = chosen.get(cell.key)
            if held is None or cell.outcome != "skipped" or held[0].outcome == "skipped":
                chosen[cell.key] = (cell, index)
    return [c for c, _ in chosen.values()], {key: i for key, (_, i) in chosen.items()}


def session_comparison(comparisons: list[Comparison], session: list[RunRecord]) -> Comparison:
    """The passes' comparisons as one: every change of every pass, and the earlier runs they were
    compared with (the session's own passes left out), newest first."""
    ours = {r.run_id for r in session}
    baseline = {r.run_id: r for c in comparisons for r in c.baseline if r.run_id not in ours}
    changes = list(dict.fromkeys(change for c in comparisons for change in c.changes))
    return Comparison(sorted(baseline.values(), key=lambda r: (r.started, r.run_id), reverse=True), changes)


def render(history_path: Path, out_dir: Path, runs: int = DEFAULT_RUNS) -> Rendered:
    out_dir.mkdir(parents=True, exist_ok=True)
    with History(history_path, create=False) as history:
        report = Report(history, runs)
        page = report.html()
        summary = report.markdown()
    html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text(summary, encoding="utf-8")
    return Rendered(html_path, md_path, len(report.runs), report.images)


def image_sources(page: str) -> Iterable[str]:
    import re

    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
header { padding: .4em 1em; margin: 0 -1.5em 1em; border-bottom: 3px solid #2a2; background: #efe; }
header.failed { border-color: #c22; background: #fee; }
header h1 { margin: .2em 0; font-size: 20px; }
header p { margin: .2em 0; }
.alert { border: 2px solid #c22; background: #fff4f4; padding: .2em 1em; }
.alert h2 { color: #c22; margin: .3em 0; font-size: 16px; }
h2 { font-size: 16px; border-bottom: 1px solid #ccc; }
h3 { font-size: 14px; margin-bottom: .2em; }
li.regression { color: #b00; }
table.grid, table.samples { border-collapse: collapse; font: 12px ui-monospace, monospace; }
table.grid td, table.grid th, table.samples td, table.samples th { border: 1px solid #ddd; padding: 1px 6px; text-align: right; }
table.grid td:nth-child(-n+2), table.grid th:nth-child(-n+2), table.samples td, table.samples th { text-align: left; }
td.failed { background: #fcc; font-weight: bold; }
td.skipped, td.none { color: #999; }
td.changed { outline: 2px solid #e80; outline-offset: -2px; }
.legend, .note { color: #666; font-size: 11px; }
.plots img { margin: 4px; border: 1px solid #eee; max-width: 48%; vertical-align: top; }
.pictures figure { display: inline-block; margin: 4px; }
.pictures img { max-width: 100%; border: 1px solid #ccc; }
nav { margin: .6em 0; }
ol.passes { margin: .2em 0; padding-left: 1.5em; font-size: 12px; }
"""
