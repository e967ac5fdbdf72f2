"""Runs of the throw-away toy model through the real plugin, one after another, each appending
itself to one history, with the interleaved speed-up gate timed for real: unchanged runs flag
nothing, a run with an injected slowdown and parity drift (``ZOO_TEST_INJECT``) is flagged on both,
by the regression module's own statistics, and ``--fail-on-regression`` fails it."""
from __future__ import annotations

import pytest

from tooling.history.store import History

# toy_project (tests/engine/conftest.py): a project with one toy model, run in a subprocess.
pytest_plugins = ["pytester"]
GATES = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "markers=toynet",
         "-m", "parity or benchmark", "-k", "not throughput", "--backends", "onnxruntime", "--no-verdict-cache")
# Toy rounds take microseconds, so their ratios scatter far more than a real model's: the toy here
# times 40 rounds, and its injected slowdown (100x) stands out of three toy runs' spread (Student t
# on 2 degrees of freedom has heavy tails); the 20 % one is measured on real models (README).
INJECTED = "slowdown=onnxruntime:99,drift=onnxruntime:10"


@pytest.fixture
def toy_with_rounds(toy_project):
    yaml = toy_project.path / "baselines" / "toynet.yaml"
    text = yaml.read_text()
    assert "smoke: {batch_sizes: [1, 2]}" in text
    yaml.write_text(text.replace("smoke: {batch_sizes: [1, 2]}", "smoke: {batch_sizes: [1, 2], benchmark_rounds: 40}"))
    return toy_project


def run(project, history, *extra):
    return project.runpytest_subprocess(*GATES, f"--history={history}", *extra)


def test_unchanged_runs_flag_nothing_and_an_injected_slowdown_and_drift_fail_the_next(toy_with_rounds, monkeypatch):
    toy_project = toy_with_rounds
    history = toy_project.path / "h.sqlite"
    first = run(toy_project, history)
    first.stdout.fnmatch_lines(["*changes since (no earlier run of this host class and versions)*",
                                f"history: {history} (1 runs; *"])
    for n in (2, 3):
        unchanged = run(toy_project, history, "--fail-on-regression")
        unchanged.stdout.fnmatch_lines([f"0 regression(s), 0 other change(s) against the last {n - 1} run(s) *"])
        assert unchanged.ret == 0
    monkeypatch.setenv("ZOO_TEST_INJECT", INJECTED)
    monkeypatch.setenv("ZOO_SESSION_ID", "nightly-test")  # as tooling/nightly.sh exports it
    injected = run(toy_project, history, "--fail-on-regression")
    injected.stdout.fnmatch_lines([
        "*deployed-vs-onnx*↑1e-6*",
        "*changes since 20??-??-?? ??:?? UTC*",
        "* regression(s), 0 other change(s) against the last 3 run(s) of this host class and versions",
        "*REGRESSION*cpu-speedup*onnxruntime: speed-up *x -> *x (-*%*between runs p=*Mann-Whitney U p=*",
        "*REGRESSION*deployed-vs-onnx*onnxruntime: worst |difference| of y grew*tolerance 1.0e-05",
        f"history: {history} (4 runs; *, a pass of session nightly-test, compared and written in *",
    ])
    assert injected.ret == 1, "--fail-on-regression fails a run whose gates all passed"
    with History(history) as stored:
        ids = stored.run_ids()
        assert len(ids) == 4
        latest = stored.load_run(ids[0])
        assert latest.session_id == "nightly-test" and stored.load_run(ids[1]).session == ids[1]
    cells = {c.key: c for c in latest.cells}
    deployed = [c for k, c in cells.items() if k[1] == "deployed-vs-onnx" and k[3] == "onnxruntime"]
    assert deployed and all(c.figures["outputs.y.max_abs"] == pytest.approx(1e-6) and c.figures["outputs.y.atol"] == 1e-5
                            for c in deployed)
    assert latest.environment["versions"]["torch"].startswith("2.13") and latest.environment["threads"] == 1

    from tooling.htmlreport.render import Report, render

    with History(history) as stored:
        report = Report(stored)
    parity, tolerance = report._parity_series("toynet")
    assert parity and all(len(v) == 4 and None not in v for v in parity.values()), "four runs: four points per series"
    assert set(tolerance.values()) == {1e-5}
    page = render(history, toy_project.path / "report").html.read_text()
    first_screen = page[: page.index('id="overview"')]
    assert "changes since" in first_screen and "worst |difference| of y grew" in first_screen
