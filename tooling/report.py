"""The conformance matrix (model x gate x backend x case) and the throughput table of a run."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tooling.roofline import roofline


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

    def attach_roofline(self, flop_per_call: float, peak_gflops: float | None) -> "ThroughputEntry":
        """Fill the roofline figures from FLOPs per call (``graph_flops``) and a peak
        (``host_peak_gflops``, or None where the host's CPU peak says nothing: NPU, GPU)."""
        figures = roofline(flop_per_call, self.mean_s, peak_gflops)
        self.gflop_per_call = figures["gflop_per_call"]
        self.achieved_gflops = figures["achieved_gflops"]
        self.peak_gflops = figures["peak_gflops"]
        self.peak_fraction = figures["peak_fraction"]
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MatrixRow:
    model: str
    gate: str
    backend: str
    case: str
    outcome: str  # passed, failed, skipped
    detail: str = ""
    nodeid: str = ""
    results: list[dict] = field(default_factory=list)


@dataclass
class ConformanceMatrix:
    rows: list[MatrixRow] = field(default_factory=list)

    def add(self, row: MatrixRow) -> None:
        self.rows.append(row)

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
        if not self.rows:
            return []
        width_gate = max(len(r.gate) for r in self.rows)
        width_backend = max(len(r.backend) for r in self.rows)
        width_case = max(len(r.case) for r in self.rows)
        lines = []
        for model in sorted({r.model for r in self.rows}):
            lines.append(f"[{model}]")
            for r in sorted((r for r in self.rows if r.model == model), key=lambda r: (r.gate, r.backend, r.case)):
                detail = f"  {r.detail}" if r.outcome != "passed" and r.detail else _figures(r.results)
                lines.append(
                    f"  {r.gate:<{width_gate}}  {r.backend:<{width_backend}}  {r.case:<{width_case}}  "
                    f"{r.outcome.upper():<7}{detail}"
                )
        counts = self.counts()
        lines.append(
            f"total: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        )
        for reason, n in self.skip_reasons().most_common():
            lines.append(f"  skipped x{n}: {reason}")
        return lines

    def write_json(self, path: Path, throughput: list[dict] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "counts": dict(self.counts()),
            "skips_by_reason": dict(self.skip_reasons()),
            "rows": [asdict(r) for r in self.rows],
            "throughput": throughput or [],
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)


def _reason_class(detail: str) -> str:
    """Group skip messages by their cause (the text before the first colon names it)."""
    return detail.split(":", 1)[0].strip()[:100] if detail else "no reason given"


def _figures(results: list[dict]) -> str:
    parts = []
    for result in results:
        if "throughput" in result:
            t = result["throughput"]
            ratio = f", {t['speedup_vs_torch']:.2f}x torch" if t.get("speedup_vs_torch") else ""
            parts.append(f"{t['backend']} {t['rate']:.1f} {t['unit']} on {t['device']}{ratio}")
        if "metrics" in result:
            shown = {k: round(v, 4) for k, v in result["metrics"].items() if "/" not in k}
            parts.append(str(shown))
        if "speedups" in result:
            parts.append("best " + result["best"] + ": " + ", ".join(f"{n} {r:.2f}x" for n, r in result["speedups"].items()))
        if "worst_max_abs" in result:
            parts.append(f"max_abs {result['worst_max_abs']:.2g}")
        for stand_in in result.get("upstream_stand_ins", ()):  # e.g. "torchvision... served by ONNX Runtime ..."
            parts.append(stand_in.split(":")[0])
    return ("  " + "; ".join(parts)) if parts else ""
