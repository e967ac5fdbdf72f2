"""Runs of the throw-away toy model through the real plugin, one after another, each appending
itself to one history: the second run compares itself with the first, an injected parity drift
(``ZOO_TEST_INJECT``) is flagged on the run that has it, and ``--fail-on-regression`` fails it."""
from __future__ import annotations

import pytest

from tooling.history.store import History

# toy_project (tests/engine/conftest.py): a project with one toy model, run in a subprocess.
pytest_plugins = ["pytester"]
PARITY = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet",
          "-m", "parity", "--backends", "onnxruntime", "--no-verdict-cache")


def run(project, history, *extra):
    return project.runpytest_subprocess(*PARITY, f"--history={history}", *extra)


def test_a_run_is_compared_with_the_one_before_and_an_injected_drift_fails_it(toy_project, monkeypatch):
    history = toy_project.path / "h.sqlite"
    first = run(toy_project, history)
    first.stdout.fnmatch_lines(["*changes since (no earlier run of this host class and versions)*",
                                f"history: {history} (1 runs; *"])
    monkeypatch.setenv("ZOO_TEST_INJECT", "drift=onnxruntime:10")
    drifted = run(toy_project, history, "--fail-on-regression")
    drifted.stdout.fnmatch_lines([
        "*deployed-vs-onnx*↑1e-6*",
        "*changes since 20??-??-?? ??:?? UTC*",
        "2 regression(s), 0 other change(s) against the last 1 run(s) of this host class and versions",
        "*REGRESSION*deployed-vs-onnx*onnxruntime: worst |difference| of y grew*tolerance 1.0e-05",
        f"history: {history} (2 runs; *",
    ])
    assert drifted.ret == 1, "--fail-on-regression fails a run whose gates all passed"
    with History(history) as stored:
        ids = stored.run_ids()
        assert len(ids) == 2
        latest = stored.load_run(ids[0])
    cells = {c.key: c for c in latest.cells}
    deployed = [c for k, c in cells.items() if k[1] == "deployed-vs-onnx" and k[3] == "onnxruntime"]
    assert deployed and all(c.figures["outputs.y.max_abs"] == pytest.approx(1e-6) and c.figures["outputs.y.atol"] == 1e-5
                            for c in deployed)
    assert latest.environment["versions"]["torch"].startswith("2.13") and latest.environment["threads"] == 1

    from tooling.htmlreport.render import Report, render

    with History(history) as stored:
        report = Report(stored)
    parity, tolerance = report._parity_series("toynet")
    assert parity and all(len(v) == 2 and None not in v for v in parity.values()), "two runs: two points per series"
    assert set(tolerance.values()) == {1e-5}
    page = render(history, toy_project.path / "report").html.read_text()
    first_screen = page[: page.index('id="overview"')]
    assert "changes since" in first_screen and "worst |difference| of y grew" in first_screen
