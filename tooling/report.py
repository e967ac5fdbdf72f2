"""The conformance matrix (model x gate x backend x case) and the throughput table of a run."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tooling import jsonio
from tooling.roofline import roofline

OVER_PEAK_MARK = ">peak"


@dataclass
class ThroughputEntry:
    model: str
    case: str
    backend: str
    device: str
    rate: float  # items / mean seconds per call: the guides' figure
    unit: str
    mean_s: float
    best_s: float  # fastest call
    # Median of per-round ratios against torch eager timed in the same interleaved rounds.
    speedup_vs_torch: float | None = None
    # Roofline (tooling/roofline.py): work per call from the ONNX graph, the rate it was done at,
    # and that rate as a fraction of this host's measured GEMM peak (CPU rows, same thread count).
    gflop_per_call: float | None = None
    achieved_gflops: float | None = None
    peak_gflops: float | None = None
    peak_fraction: float | None = None
    peak_note: str | None = None  # a rate above the measured peak: says so instead of a fraction over 1

    def attach_roofline(self, flop_per_call: float, peak_gflops: float | None) -> "ThroughputEntry":
        """Fill the roofline figures from FLOPs per call (``graph_flops``) and a peak
        (``host_peak_gflops``, or None where the host's CPU peak says nothing: NPU, GPU)."""
        figures = roofline(flop_per_call, self.mean_s, peak_gflops)
        self.gflop_per_call = figures["gflop_per_call"]
        self.achieved_gflops = figures["achieved_gflops"]
        self.peak_gflops = figures["peak_gflops"]
        self.peak_fraction = figures["peak_fraction"]
        self.peak_note = figures["peak_note"]
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MatrixRow:
    model: str
    gate: str
    backend: str
    case: str
    outcome: str  # passed, failed, skipped; error: the test never reached its verdict (a build fault)
    detail: str = ""
    nodeid: str = ""
    results: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # warnings raised while it ran ("Category: message")
    cached: dict | None = None  # a reused verdict: the run and commit that computed it
    kind: str = ""  # the gate's result kind (tooling/gates.py): which figure its cell shows, FIGURES
    unavailable: dict | None = None  # skipped for its backend: {"reason", "selected": False if --backends left it out}


@dataclass
class ConformanceMatrix:
    rows: list[MatrixRow] = field(default_factory=list)
    builds: list[dict] = field(default_factory=list)  # artifacts (re)built in this run, and why
    # (model, gate, case, backend) -> symbols of what changed against earlier runs (tooling/history)
    marks: dict[tuple[str, str, str, str], str] = field(default_factory=dict)

    def add(self, row: MatrixRow) -> None:
        self.rows.append(row)

    def add_builds(self, builds: list[dict]) -> None:
        known = {b["artifact"] for b in self.builds}
        self.builds += [b for b in builds if b["artifact"] not in known]

    def render_builds(self) -> list[str]:
        return [f"  {b['artifact']}: {b['reason']} ({b['seconds']} s)" for b in self.builds] + [
            f"built {len(self.builds)} artifact(s); every other one was reused from the cache"]

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.rows)

    def backends_without_a_gate(self, required: tuple[str, ...]) -> dict[str, str]:
        """Each required backend with no row that ran (passed or failed), and why it did not."""
        ran = {r.backend for r in self.rows if r.outcome != "skipped"}
        skipped = {}
        for r in self.rows:
            if r.outcome == "skipped":
                skipped.setdefault(r.backend, r.detail)
        return {b: skipped.get(b, "no selected test uses it") for b in required if b not in ran}

    def skip_reasons(self) -> Counter:
        return Counter(_reason_class(r.detail) for r in self.rows if r.outcome == "skipped")

    def render(self) -> list[str]:
        """The terminal view: per model, a grid of gate x case rows by backend columns, one short
        figure per cell (``legend`` below says what each is), backends that cannot run on this host
        folded into one line per reason, failures listed with their message. Full detail: JSON."""
        if not self.rows:
            return []
        usable = {r.backend for r in self.rows if not r.unavailable}
        # A backend none of whose rows could run is folded out of the grid into one line per reason.
        folded = {r.backend: r.unavailable for r in self.rows if r.unavailable and r.backend not in usable}
        lines: list[str] = []
        for model in sorted({r.model for r in self.rows}):
            lines.extend(_model_grid(model, [r for r in self.rows if r.model == model], set(folded), self.marks))
        by_reason: dict[tuple[bool, str], list[str]] = {}
        for backend, unavailable in folded.items():
            by_reason.setdefault((unavailable["selected"], unavailable["reason"]), []).append(backend)
        for (selected, why), backends in sorted(by_reason.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            where = "not on this host" if selected else "not selected"
            lines.append(f"{where}: {', '.join(sorted(backends))}: {why}")
        counts = self.counts()
        elsewhere = sum(1 for r in self.rows if r.backend in folded and folded[r.backend]["selected"])
        cached = sum(1 for r in self.rows if r.cached)
        lines.append(f"total: {counts['passed']} passed" + (f" ({cached} cached {CACHED_MARK})" if cached else "")
                     + f", {counts['failed']} failed, {counts['skipped']} skipped"
                     + (f", {counts['error']} build errors" if counts["error"] else "")
                     + (f" ({elsewhere} on backends not on this host)" if elsewhere else ""))
        shown = Counter(_reason_class(r.detail) for r in self.rows
                        if r.outcome == "skipped" and not (r.unavailable and r.backend in folded))
        for reason, n in shown.most_common():
            lines.append(f"  skipped x{n}: {reason}")
        for r in self.rows:
            for stand_in in (s for result in r.results for s in result.get("upstream_stand_ins", ())):
                lines.append(f"  * {r.model} {r.gate} {r.case}: {stand_in}")
            if r.outcome == "failed":
                lines.append(f"  FAILED {r.model} {r.gate} {r.backend} {r.case}: {r.detail}")
            if r.outcome == "error":
                lines.append(f"  BUILD ERROR {r.model} {r.gate} {r.backend} {r.case}: {r.detail}")
        lines.extend(self.render_warnings())
        lines.append(LEGEND)
        return lines

    def render_warnings(self) -> list[str]:
        """Each distinct warning once, with the rows it was raised in (full list per row: JSON)."""
        where: dict[str, list[str]] = {}
        for r in self.rows:
            for warning in r.warnings:
                where.setdefault(warning, []).append(f"{r.model} {r.gate} {r.backend} {r.case}")
        lines = []
        for warning, rows in where.items():
            more = f" (+{len(rows) - 1} more rows)" if len(rows) > 1 else ""
            lines.append(f"  warning in {rows[0]}{more}: {warning[:300]}")
        return lines

    def write_json(self, path: Path, throughput: list[dict] | None = None, run: dict | None = None) -> None:
        """The run's full report; ``run`` says which run it is and how it ended. A run without a
        single row still writes one (saying so), so a reader never takes an earlier run's rows
        for this one's."""
        payload = {
            "run": run or {},
            "note": "" if self.rows else "no conformance row in this run (no gate test selected, or "
                    "the run stopped before the first one finished)",
            "counts": {**self.counts(), "cached": sum(1 for r in self.rows if r.cached)},
            "skips_by_reason": dict(self.skip_reasons()),
            "rows": [asdict(r) for r in self.rows],
            "throughput": throughput or [],
            "builds": self.builds,
        }
        jsonio.write_json(path, payload, default=str)


def _reason_class(detail: str) -> str:
    """Group skip messages by their cause (the text before the first colon names it)."""
    return detail.split(":", 1)[0].strip()[:100] if detail else "no reason given"


CACHED_MARK = "†"
BACKEND_ORDER = ("torch", "onnx", "best-cpu")  # references first, then deployed backends as met


def _model_grid(model: str, rows: list[MatrixRow], folded: set[str],
                marks: dict[tuple[str, str, str, str], str] | None = None) -> list[str]:
    cells: dict[tuple[str, str], dict[str, str]] = {}
    columns: list[str] = []
    for r in rows:
        per_backend = _cell_figures(r)
        for backend, text in per_backend.items():
            if backend in folded:
                continue
            mark = (marks or {}).get((r.model, r.gate, r.case, backend), "")
            cells.setdefault((r.gate, r.case), {})[backend] = mark + text
            if backend not in columns:
                columns.append(backend)
    met = list(columns)
    columns.sort(key=lambda b: (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), met.index(b)))
    keys = sorted(cells)
    gate_width = max([len("gate")] + [len(g) for g, _ in keys])
    case_width = max([len("case")] + [len(c) for _, c in keys])
    widths = {b: max([len(b)] + [len(cells[k].get(b, "")) for k in keys]) for b in columns}
    header = f"  {'gate':<{gate_width}}  {'case':<{case_width}}  " + "  ".join(f"{b:>{widths[b]}}" for b in columns)
    lines = [f"[{model}]", header.rstrip()]
    for gate, case in keys:
        row = cells[(gate, case)]
        lines.append((f"  {gate:<{gate_width}}  {case:<{case_width}}  "
                      + "  ".join(f"{row.get(b, '.'):>{widths[b]}}" for b in columns)).rstrip())
    return lines


def cell_texts(row: MatrixRow) -> dict[str, str]:
    """backend -> the grid cell of one matrix row, as the terminal shows it (the history keeps it)."""
    return _cell_figures(row)


def _cell_figures(row: MatrixRow) -> dict[str, str]:
    """backend -> the cell text for one matrix row (a speed-up row fills one cell per contender)."""
    if row.outcome == "skipped" and not row.results:
        return {row.backend: "skip"}
    speedups = next((r for r in row.results if "speedups" in r), None)
    if row.kind == "speedup" and speedups is not None:
        cells = {"torch": "1x"}
        throughputs = {r["throughput"]["backend"]: r["throughput"] for r in row.results if "throughput" in r}
        for backend, ratio in speedups["speedups"].items():
            cells[backend] = f"{ratio:.2f}x" + _peak_figure(throughputs.get(backend, {}))
        if row.outcome == "failed":
            cells[speedups["best"]] = "FAIL " + cells[speedups["best"]]
        return {b: text + CACHED_MARK * bool(row.cached) for b, text in cells.items()}
    figure = FIGURES[row.kind][0](row.results) if row.kind in FIGURES else ""
    if row.outcome == "error":
        return {row.backend: "ERROR"}
    if row.outcome == "failed":
        return {row.backend: f"FAIL {figure}".strip()}
    if row.outcome == "skipped":
        return {row.backend: f"({figure})" if figure else "skip"}  # a measurement without a gate
    stand_ins = any(result.get("upstream_stand_ins") for result in row.results)
    return {row.backend: (figure or "ok") + "*" * stand_ins + CACHED_MARK * bool(row.cached)}


def _peak_figure(throughput: dict) -> str:
    """' 35%' of the host's GEMM peak; ' >peak' where the rate beat the peak as measured (the peak
    was measured low: a percentage above 100 would be a figure about the measurement, not the run)."""
    if throughput.get("peak_note") or (throughput.get("peak_fraction") or 0) > 1:
        return f" {OVER_PEAK_MARK}"
    peak = throughput.get("peak_fraction")
    return f" {peak:.0%}" if peak is not None else ""


def _exponent(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def _parity_figure(results: list[dict]) -> str:
    worst = next((r["worst_max_abs"] for r in results if "worst_max_abs" in r), None)
    return "" if worst is None else "0" if worst == 0 else _exponent(worst)


def _accuracy_figure(results: list[dict]) -> str:
    """The gated metric (``metric``), not whichever the slice happened to return first."""
    scored = next((r for r in results if r.get("metrics") and r.get("metric") in r["metrics"]), None)
    if scored is None:
        return ""
    move = scored.get("moves_vs_reference", {}).get(scored["metric"])  # a staged pass vs the torch eager one
    return f"{scored['metrics'][scored['metric']]:.4g}" + ("" if move is None else f" Δ{move:+.2g}")


def _agreement_figure(results: list[dict]) -> str:
    """How far the backend moved any gated metric from torch eager's."""
    deltas = next((r["metric_deltas"] for r in results if r.get("metric_deltas")), None)
    if deltas is None:
        return ""
    worst = max(deltas.values())
    return "Δ0" if worst == 0 else "Δ" + _exponent(worst)


def _throughput_figure(results: list[dict]) -> str:
    rate = next((r["throughput"]["rate"] for r in results if "throughput" in r), None)
    return "" if rate is None else f"{rate:.4g}"


# Per result kind (a gate's ``kind``, tooling/gates.py): its cell's figure and what the legend says
# of it. A speed-up row fills one cell per contender instead (_cell_figures).
FIGURES: dict[str, tuple[Callable[[list[dict]], str], str]] = {
    "parity": (_parity_figure, "parity = worst |difference|"),
    "accuracy": (_accuracy_figure, "accuracy = gated metric (Δ: its move from the torch eager reference's "
                 "score of the same staged set)"),
    "agreement": (_agreement_figure, "accuracy-agreement = Δ largest metric move vs torch eager"),
    "throughput": (_throughput_figure, "throughput = rate"),
    "speedup": (lambda results: "", f"cpu-speedup = x torch eager (% of host GEMM peak; {OVER_PEAK_MARK}: faster "
                "than the peak as measured, so the peak was measured low)"),
}
LEGEND = ("cells: " + "; ".join(text for _, text in FIGURES.values()) + "; (x) = measured, not gated; "
          "* = upstream stand-in, see below; skip = see reasons; FAIL = see below; "
          "ERROR = a build fault, no verdict (see below); . = not a case; "
          "† = cached verdict, reused: its inputs did not change (run and commit: JSON report)")


# Figures per sample, per round or per picture: kept in the JSON report and the history, left out of
# JUnit properties (a COCO pass would add thousands).
PER_SAMPLE_KEYS = ("samples", "ratio_samples", "pictures")


def flat_properties(cell: dict[str, Any], outcome: str, results: list[dict],
                    cached: dict | None = None) -> list[tuple[str, str]]:
    """JUnit-friendly properties: flat ``zoo.<key>`` -> string pairs, one per scalar figure
    (nested dicts and lists become dotted keys; throughput figures are keyed by backend); a reused
    verdict says ``zoo.verdict=cached`` and where it came from (``zoo.cached.run``, ``.commit``)."""
    flat = [(f"zoo.{k}", str(v)) for k, v in cell.items()] + [("zoo.outcome", outcome)]
    if cached:
        flat += [("zoo.verdict", "cached")] + _flatten("zoo.cached", cached)
    for result in results:
        for key, value in result.items():
            if key in PER_SAMPLE_KEYS:
                continue
            if key == "throughput" and isinstance(value, dict):
                key = f"throughput.{value.get('backend', '')}"
            flat.extend(_flatten(f"zoo.{key}", value))
    return flat


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _flatten(f"{prefix}.{k}", v)]
    if isinstance(value, (list, tuple)):
        return [pair for i, v in enumerate(value) for pair in _flatten(f"{prefix}.{i}", v)]
    return [(prefix, "" if value is None else str(value))]
