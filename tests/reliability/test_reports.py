"""The report is this run's: written by every run (no rows, interrupted), strict JSON, refused at
start where it cannot be written; and the endings of a gate say what happened (a full disk is a
build error with its own cell, a library's warning is recorded in the row it was raised in).

Each probe runs pytest in a subprocess on a few toy "gates": tests whose items carry a conformance
cell, as the engine's gates do, so the real plugin builds rows and writes the report.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tooling.model_spec import PROJECT_ROOT

pytest_plugins = ["pytester"]

# Makes every test of the toy files a gate row (the engine does this for ConformanceSuite gates).
CONFTEST = '''
def pytest_collection_modifyitems(items):
    for item in items:
        item.user_properties.append(("zoo_cell", {"model": "toy", "gate": "accuracy", "backend": "onnxruntime",
                                                  "case": item.name}))
'''

GATES = '''
import math
import numpy as np
import pytest
from tooling.cache import CacheFull

def test_nan_metric_with_a_library_warning(request):
    ap = float(np.mean(np.array([])))  # what COCOeval does for an area range without people
    request.node.user_properties.append(("zoo_result", {"metrics": {"AP": ap, "AR": 0.5}}))

def test_full_disk_during_export():
    raise CacheFull("/cache: no space left on its disk while writing onnx artifact net-1x3-ab12 [ENOSPC]")

def test_interrupted_here():
    raise KeyboardInterrupt

def test_never_reached():
    pass
'''


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def toy(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(CONFTEST)
    return pytester


def _run(toy, *args):
    return toy.runpytest_subprocess("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-p", "no:xdist",
                                    "--history", "none", *args)


def test_interrupted_run_reports_what_it_finished_in_strict_json(toy):
    toy.makepyfile(test_gates=GATES)
    report = toy.path / "out" / "report.json"
    result = _run(toy, "--zoo-report", str(report))
    assert result.ret == pytest.ExitCode.INTERRUPTED
    payload = _strict(report.read_text())
    assert payload["run"]["interrupted"] is True and payload["run"]["exit_status"] == 2
    rows = {r["case"]: r for r in payload["rows"]}
    assert set(rows) == {"test_nan_metric_with_a_library_warning", "test_full_disk_during_export"}
    nan_row = rows["test_nan_metric_with_a_library_warning"]
    assert nan_row["results"][0]["metrics"] == {"AP": None, "AR": 0.5}
    assert payload["nonfinite"] == {"rows.0.results.0.metrics.AP": "nan"}
    # the library's warning is in the row it belongs to, not in pytest's run-wide summary
    assert any(w.startswith("RuntimeWarning: Mean of empty slice") for w in nan_row["warnings"]), nan_row
    assert "warnings summary" not in result.stdout.str()
    # a full disk is the build's error, with its own cell, not a failed verdict
    disk = rows["test_full_disk_during_export"]
    assert disk["outcome"] == "error" and "no space left" in disk["detail"]
    result.stdout.fnmatch_lines(["*BUILD ERROR toy accuracy onnxruntime test_full_disk_during_export: *no space left*",
                                 "*conformance report: *report.json (interrupted: the rows of the tests that finished)"])


def test_run_without_a_row_replaces_the_previous_report(toy):
    report = toy.path / "report.json"
    report.write_text(json.dumps({"rows": [{"model": "toy", "outcome": "passed"}], "counts": {"passed": 1}}))
    toy.makepyfile(test_gates="def test_a():\n    pass\n")
    result = _run(toy, "--zoo-report", str(report), "-k", "nothing_matches")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    payload = _strict(report.read_text())
    assert payload["rows"] == [] and not any(payload["counts"].values()) and "no conformance row" in payload["note"]
    assert payload["run"]["interrupted"] is False and payload["run"]["id"]
    result.stdout.fnmatch_lines(["*conformance report: *report.json (no conformance row in this run)"])


def test_unwritable_report_directory_is_one_usage_error_before_any_test(toy):
    marker = toy.path / "ran"
    toy.makepyfile(test_gates=f"from pathlib import Path\n\ndef test_a():\n    Path({str(marker)!r}).touch()\n")
    blocker = toy.path / "a-file"
    blocker.write_text("")
    result = _run(toy, "--zoo-report", str(blocker / "reports" / "conformance.json"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert not marker.exists(), "a test ran before the report path was refused"
    errors = result.stderr.str()
    assert f"--zoo-report {blocker / 'reports' / 'conformance.json'}: {blocker / 'reports'} cannot be written" in errors
    assert "Traceback" not in errors and errors.count("cannot be written") == 1
