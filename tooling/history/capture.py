"""What a finished pytest run contributes to the history: its environment and, per matrix row,
one cell per (model, gate, case, backend) with every figure of the row's results, flattened."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from tooling.history.store import CellRecord, RunRecord
from tooling.report import cell_texts

VERSIONED_PACKAGES = ("torch", "onnxruntime", "openvino", "onnx", "ais_bench", "aclruntime")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cann_version() -> str | None:
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or "/usr/local/Ascend/ascend-toolkit/latest"
    for name in ("version.cfg", "version.info"):
        path = Path(home) / name
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if "version" in line.lower() and "=" in line:
                    return line.split("=", 1)[1].strip()
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_environment(root: Path, threads: int, rows: Iterable[Any], builds: list[dict]) -> dict[str, Any]:
    """Commit, host, CPU, device, versions, threads and the artifacts built: what a comparison
    between runs must hold equal (host class, versions) or may want to explain a change by."""
    rows = list(rows)
    devices = sorted({r["throughput"].get("device", "") for row in rows for r in row.results
                      if "throughput" in r and r["throughput"].get("device") not in (None, "cpu")})
    versions = {"python": platform.python_version(), **{p: v for p in VERSIONED_PACKAGES if (v := _package_version(p))}}
    cann = _cann_version()
    if cann:
        versions["cann"] = cann
    return {
        "commit": _commit(root),
        "host": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "device": ",".join(devices) or "cpu",
        "versions": versions,
        "threads": threads,
        "artifacts": [b.get("artifact") for b in builds],
    }


def _flatten(prefix: str, value: Any, figures: dict, series: dict) -> None:
    if isinstance(value, bool):
        figures[prefix] = float(value)
    elif isinstance(value, (int, float)):
        figures[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, figures, series)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        # Kept whole (the rank test reads the speed-up ratio samples; the report plots quantiles).
        series[prefix] = [float(v) for v in value]
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, figures, series)


def cells_of_row(row: Any) -> list[CellRecord]:
    """One cell per backend the row speaks for: a speed-up row holds one per contender (torch eager
    included), with its rate, speed-up and per-round ratios; any other row is one cell. A reused
    (cached) verdict's cells carry the figure ``cached`` = 1: they repeat an earlier measurement."""
    cells = _cells_of_row(row)
    if getattr(row, "cached", None):
        for cell in cells:
            cell.figures["cached"] = 1.0
    return cells


def _cells_of_row(row: Any) -> list[CellRecord]:
    texts = cell_texts(row)
    speedups = next((r for r in row.results if "speedups" in r), None)
    if speedups is None:
        figures: dict[str, float] = {}
        series: dict[str, list[float]] = {}
        for result in row.results:
            _flatten("", {k: v for k, v in result.items() if k not in ("samples", "pictures")}, figures, series)
        return [CellRecord(row.model, row.gate, row.case, row.backend, row.outcome, row.detail, figures, series,
                           texts.get(row.backend, ""))]
    cells = []
    for result in row.results:
        if "throughput" not in result:
            continue
        backend = result["throughput"]["backend"]
        figures, series = {}, {}
        _flatten("throughput", result["throughput"], figures, series)
        if backend in speedups["speedups"]:
            figures["speedup"] = float(speedups["speedups"][backend])
            figures["floor"] = float(speedups.get("floor") or 0.0)
        ratios = (speedups.get("ratio_samples") or {}).get(backend)
        if ratios:
            series["ratio_samples"] = [float(r) for r in ratios]
        outcome = row.outcome if backend == speedups.get("best") or row.outcome != "failed" else "passed"
        cells.append(CellRecord(row.model, row.gate, row.case, backend, outcome, row.detail, figures, series,
                                texts.get(backend, "")))
    return cells


def samples_of_row(row: Any) -> list[tuple]:
    """Per-sample figures an accuracy pass recorded (``samples``: name -> figure -> value)."""
    return [(row.model, row.gate, row.backend, sample, name, value)
            for result in row.results for sample, figures in (result.get("samples") or {}).items()
            for name, value in figures.items()]


def pictures_of_row(row: Any) -> list[tuple]:
    """Disagreement pictures a gate saved as PNG files (``pictures``: caption -> path)."""
    out = []
    for result in row.results:
        for caption, path in (result.get("pictures") or {}).items():
            try:
                out.append((row.model, row.gate, row.backend, caption, Path(path).read_bytes()))
            except OSError:
                continue  # a picture whose file is gone (tmp dir cleaned) is simply not kept
    return out


def run_record(run_id: str, started: float, exit_status: int | None, environment: dict, rows: Iterable[Any]) -> RunRecord:
    rows = list(rows)
    run = RunRecord(run_id, started, time.time(), exit_status, environment)
    for row in rows:
        run.cells += cells_of_row(row)
        run.samples += samples_of_row(row)
        run.pictures += pictures_of_row(row)
    return run
