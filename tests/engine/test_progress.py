"""Resumable accuracy records and progress lines."""
from __future__ import annotations

import io

import numpy as np

from tooling.model_spec import PROJECT_ROOT
from tooling.progress import ProgressReporter, ResultStore

FINGERPRINT = {"checkpoint": [123, 456], "backend": "onnxruntime"}


def test_records_survive_a_restart_of_the_process(tmp_path):
    store = ResultStore(tmp_path / "run", FINGERPRINT)
    store.save("001_Walking", {"err": np.array(0.25)})
    again = ResultStore(tmp_path / "run", FINGERPRINT)
    assert again.resumed == 1
    calls = []
    record = again.cached("001_Walking", lambda: calls.append(1) or {"err": np.array(9.0)})
    assert float(record["err"]) == 0.25 and not calls


def test_changed_inputs_or_restart_discard_old_records(tmp_path):
    ResultStore(tmp_path / "run", FINGERPRINT).save("a", {"x": np.zeros(1)})
    assert ResultStore(tmp_path / "run", {**FINGERPRINT, "checkpoint": [124, 456]}).resumed == 0
    ResultStore(tmp_path / "run", FINGERPRINT).save("a", {"x": np.zeros(1)})
    assert ResultStore(tmp_path / "run", FINGERPRINT, restart=True).resumed == 0


def test_unreadable_record_is_recomputed_not_trusted(tmp_path):
    store = ResultStore(tmp_path / "run", FINGERPRINT)
    store.save("img/42.jpg", {"x": np.ones(3)})
    [path] = store.completed()
    path.write_bytes(path.read_bytes()[:20])  # a record cut short by a crash mid-write elsewhere
    assert store.load("img/42.jpg") is None and not path.exists()
    assert float(store.cached("img/42.jpg", lambda: {"x": np.full(3, 2.0)})["x"][0]) == 2.0


def test_progress_reports_counts_rate_and_eta():
    stream = io.StringIO()
    report = ProgressReporter("dekr accuracy", stream=stream, interval=0.0)
    report(10, 100, "images")  # first call: 10 were resumed from disk
    report(20, 100, "images")
    report(100, 100, "images")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("dekr accuracy: 10/100 images, 0.00 images/s, ETA ?")
    assert lines[1].startswith("dekr accuracy: 20/100 images,") and "ETA 0:" in lines[1]
    assert lines[-1].startswith("dekr accuracy: 100/100 images")


pytest_plugins = ["pytester"]


def test_progress_reaches_the_terminal_while_pytest_captures_output(pytester, monkeypatch):
    """A passing test's captured output is never shown; progress lines must get out anyway."""
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makepyfile(test_long_pass='''
        import sys
        from tooling.progress import ProgressReporter

        def test_long_pass(tmp_path):
            print("captured noise", file=sys.stderr)
            report = ProgressReporter("toy accuracy", interval=0.0, logfile=tmp_path / "progress.txt")
            for done in range(1, 4):
                report(done, 3, "samples")
            assert (tmp_path / "progress.txt").read_text().startswith("toy accuracy: 3/3 samples")
    ''')
    result = pytester.runpytest_subprocess("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["toy accuracy: 1/3 samples*", "toy accuracy: 3/3 samples*ETA 0:00:00"])
    assert "captured noise" not in result.stdout.str() + result.stderr.str()  # capture itself still works
