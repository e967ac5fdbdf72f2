"""The plugin's side of the history: where it lives, recording a finished run, comparing it with
earlier ones, and the test-only fault injection that proves the comparison flags what it should."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tooling.history.capture import run_environment, run_record
from tooling.history.regression import DEFAULT_WINDOW, Comparison, baseline_runs, compare
from tooling.history.store import History

DEFAULT_HISTORY = "reports/history.sqlite"
# Test-only: ZOO_TEST_INJECT="slowdown=openvino:0.2,drift=onnxruntime:10" makes this process's
# recorded figures look as if that backend ran 20 % slower, or its worst differences grew 10x
# (at least to a tenth of their tolerance). Never set by the suite itself; the history tests use it.
INJECT_ENV = "ZOO_TEST_INJECT"
# The invocation a run is one pass of: tooling/nightly.sh, .ci/run and .ci/conformance export one
# id to all their pytest passes, so the report shows the parity, accuracy and benchmark passes of
# the last nightly together. A run without it is a session of its own.
SESSION_ENV = "ZOO_SESSION_ID"


def history_path(option: str | None, rootpath: Path) -> Path | None:
    """``--history`` or ``ZOO_HISTORY`` (``none`` turns it off), else reports/history.sqlite."""
    raw = option or os.environ.get("ZOO_HISTORY") or DEFAULT_HISTORY
    if raw.strip().lower() in ("none", "off", ""):
        return None
    path = Path(raw).expanduser()
    return path if path.is_absolute() else rootpath / path


def warm_up() -> None:
    """Import scipy.stats (about 0.9 s of CPU) in the background while the tests run, so comparing
    the finished run with its baseline does not add that to the end of the run."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("scipy.stats",), name="zoo-history-warm-up",
                     daemon=True).start()


def _injections() -> dict[str, dict[str, float]]:
    spec = os.environ.get(INJECT_ENV, "").strip()
    out: dict[str, dict[str, float]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rest = item.partition("=")
        backend, _, amount = rest.partition(":")
        if kind not in ("slowdown", "drift") or not backend or not amount:
            raise ValueError(f"{INJECT_ENV}: {item!r} is not slowdown=<backend>:<fraction> or drift=<backend>:<factor>")
        out.setdefault(kind, {})[backend] = float(amount)
    return out


def inject(backend: str, results: list[dict]) -> list[dict]:
    """Apply ``ZOO_TEST_INJECT`` to one row's results (a no-op unless the variable is set)."""
    plan = _injections()
    if not plan:
        return results
    slow = plan.get("slowdown", {})
    for result in results:
        if result.get("injected"):  # the same record is reported by the setup, call and teardown phases
            continue
        result["injected"] = os.environ[INJECT_ENV]
        if "speedups" in result:
            for name, fraction in slow.items():
                if name in result["speedups"]:
                    result["speedups"][name] = result["speedups"][name] / (1 + fraction)
                    samples = result.get("ratio_samples", {}).get(name)
                    if samples:
                        result["ratio_samples"][name] = [r / (1 + fraction) for r in samples]
        if "throughput" in result and result["throughput"].get("backend") in slow:
            thr = result["throughput"]
            thr["rate"] = thr["rate"] / (1 + slow[thr["backend"]])
        factor = plan.get("drift", {}).get(backend)
        if factor:
            for stats in (result.get("outputs") or {}).values():
                stats["max_abs"] = max(stats["max_abs"] * factor, 0.1 * stats.get("atol", 0.0))
            if "worst_max_abs" in result:
                worst = [s["max_abs"] for s in (result.get("outputs") or {}).values()]
                result["worst_max_abs"] = max(worst) if worst else result["worst_max_abs"] * factor
    return results


@dataclass
class Recorded:
    path: Path
    run_label: str
    runs_stored: int
    seconds: float
    comparison: Comparison
    session_id: str = ""  # the invocation's ZOO_SESSION_ID; empty: a session of its own


def record_run(path: Path, *, run_id: str, started: float, exit_status: int | None, rootpath: Path,
               threads: int, rows: Iterable[Any], builds: list[dict],
               agreement: dict[str, dict[str, float]], window: int = DEFAULT_WINDOW) -> Recorded:
    """Compare the finished run with its baseline, then append it (one transaction)."""
    begin = time.perf_counter()
    rows = list(rows)
    environment = run_environment(rootpath, threads, rows, builds)
    run = run_record(run_id, started, exit_status, environment, rows)
    run.session_id = os.environ.get(SESSION_ENV, "").strip()
    with History(path) as history:
        comparison = compare(run, baseline_runs(history, run, window), agreement=agreement)
        history.write_run(run)
        stored = history.count_runs()
    return Recorded(path, run.label, stored, time.perf_counter() - begin, comparison, run.session_id)
