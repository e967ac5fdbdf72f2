"""The run history: schema migrations, damaged and foreign files, merging, a writer killed mid-
transaction, and the regression checks against earlier runs."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tooling.cli import main as cli
from tooling.history.regression import compare
from tooling.history.store import (
    APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, CellRecord, History, HistoryError, RunRecord,
)
from tooling.model_spec import PROJECT_ROOT

ENV = {"host": "ci-1", "cpu_model": "Test CPU", "device": "cpu", "threads": 1,
       "versions": {"python": "3.11", "torch": "2.13.0"}, "commit": "abc123"}


def make_run(n: int, *, speed: float = 2.0, worst: float = 1e-6, metric: float = 0.75, outcome: str = "passed",
             seed: int | None = None, env: dict | None = None, detail: str = "") -> RunRecord:
    rng = np.random.default_rng(n if seed is None else seed)
    ratios = list(speed * (1 + 0.02 * rng.standard_normal(20)))
    cells = [
        CellRecord("toy", "cpu-speedup", "net-b1", "openvino", "passed", "",
                   {"speedup": float(np.median(ratios)), "throughput.rate": 100 * speed}, {"ratio_samples": ratios}),
        CellRecord("toy", "deployed-vs-onnx", "net-b1", "onnxruntime", outcome, detail,
                   {"worst_max_abs": worst, "outputs.y.max_abs": worst, "outputs.y.atol": 1e-4}),
        CellRecord("toy", "accuracy-agreement", "-", "onnxruntime", "passed", "", {"metrics.AP": metric}),
    ]
    return RunRecord(f"run-{n:04d}", 1000.0 + n, 1001.0 + n, 0, dict(env or ENV), cells,
                     samples=[("toy", "accuracy-agreement", "onnxruntime", "image 42", "AP", metric)],
                     pictures=[("toy", "accuracy-agreement", "onnxruntime", "worst call", b"\x89PNG fake")])


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused_and_untouched(path, complaint: str) -> None:
    """Opening ``path`` is a HistoryError that names it and matches ``complaint``; the file keeps
    every byte."""
    before = sha(path)
    with pytest.raises(HistoryError, match=complaint) as caught:
        History(path)
    assert str(path) in str(caught.value)
    assert sha(path) == before


# -- the store ---------------------------------------------------------------------------------------
def test_a_run_is_stored_whole_and_read_back(tmp_path):
    with History(tmp_path / "h.sqlite") as history:
        assert history.write_run(make_run(1))
        assert not history.write_run(make_run(1)), "a run id is stored once"
        back = history.load_run("run-0001")
        assert history.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert back.environment["commit"] == "abc123" and back.host_class == "Test CPU | cpu | 1"
    cells = {c.key: c for c in back.cells}
    assert cells[("toy", "cpu-speedup", "net-b1", "openvino")].series["ratio_samples"] == pytest.approx(
        make_run(1).cells[0].series["ratio_samples"])
    assert cells[("toy", "deployed-vs-onnx", "net-b1", "onnxruntime")].figures["outputs.y.max_abs"] == 1e-6
    assert back.samples == [("toy", "accuracy-agreement", "onnxruntime", "image 42", "AP", 0.75)]
    assert back.pictures[0][4] == b"\x89PNG fake"


def test_non_finite_figures_are_stored_as_null(tmp_path):
    run = make_run(1)
    run.cells[2].figures["metrics.AP"] = float("nan")
    with History(tmp_path / "h.sqlite") as history:
        history.write_run(run)
        assert {c.gate: c for c in history.load_run("run-0001").cells}["accuracy-agreement"].figures["metrics.AP"] is None


def _database_at_version(path, version: int) -> None:
    db = sqlite3.connect(path)
    for step in range(version):
        db.executescript(MIGRATIONS[step])
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {version}")
    db.execute("INSERT INTO runs (run_id, started, finished, exit_status, host, host_class, versions, commit_sha)"
               " VALUES ('old', 1, 2, 0, 'h', 'Test CPU | cpu | 1', '{}', 'c0')")
    db.execute("INSERT INTO cells (run_id, model, gate, case_id, backend, outcome, detail)"
               " VALUES ('old', 'toy', 'golden', 'g.npz', 'torch', 'passed', '')")
    db.execute("INSERT INTO figures VALUES ('old', 'toy', 'golden', 'g.npz', 'torch', 'worst_max_abs', 3e-7)")
    db.commit()
    db.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_every_earlier_schema_migrates_keeping_its_runs(tmp_path, version):
    path = tmp_path / "old.sqlite"
    _database_at_version(path, version)
    with History(path) as history:
        assert history.version == SCHEMA_VERSION
        old = history.load_run("old")
        assert old.environment == {} and old.cells[0].figures == {"worst_max_abs": 3e-7}
        assert old.session == "old" and history.session_run_ids("old") == ["old"]  # a session of its own
        history.write_run(make_run(2))  # the new tables work
        assert history.load_run("run-0002").pictures


@pytest.mark.parametrize("content, complaint", [
    (b"just some text, not a database\n" * 10, "not an SQLite database"),
    (b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 200, "not a usable history database"),
])
def test_a_file_that_is_no_history_is_an_error_naming_it_and_left_untouched(tmp_path, content, complaint):
    path = tmp_path / "history.sqlite"
    path.write_bytes(content)
    assert_refused_and_untouched(path, complaint)


def test_a_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    assert_refused_and_untouched(path, "another application")


def test_a_damaged_history_is_an_error_and_left_untouched(tmp_path):
    path = tmp_path / "h.sqlite"
    with History(path) as history:
        for n in range(30):
            history.write_run(make_run(n))
        history.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    for offset in range(2 * page, len(data) - page, page):  # every page but the header's: scrambled
        data[offset + 8: offset + 200] = os.urandom(192)
    path.write_bytes(bytes(data))
    assert_refused_and_untouched(path, "damaged|not a usable")


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    History(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    assert_refused_and_untouched(path, "newer")


def test_merge_copies_each_run_once(tmp_path, capsys):
    a, b, into = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "all.sqlite"
    with History(a) as history:
        for n in (1, 2, 3):
            history.write_run(make_run(n))
    with History(b) as history:
        for n in (3, 4):
            history.write_run(make_run(n, env={**ENV, "host": "ci-2"}))
    assert cli(["history", "merge", str(into), str(a), str(b)]) == 0
    assert cli(["history", "merge", str(into), str(a), str(b)]) == 0  # again: nothing new
    out = capsys.readouterr().out
    assert f"{b}: 0 run(s) added, 2 already in" in out
    with History(into) as history:
        assert sorted(history.run_ids()) == ["run-0001", "run-0002", "run-0003", "run-0004"]
        assert history.load_run("run-0003").host == "ci-1"  # the first source's copy of a shared run


def test_merge_from_a_damaged_file_names_it(tmp_path, capsys):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not sqlite")
    assert cli(["history", "merge", str(tmp_path / "all.sqlite"), str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


KILLED_WRITER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    from tooling.history.store import History, CellRecord, RunRecord

    def run(n, cells):
        return RunRecord(f"run-{{n:04d}}", 1000.0 + n, 1001.0 + n, 0, {{"host": "h"}},
                         [CellRecord("toy", "golden", f"case-{{i}}", "torch", "passed", "", {{"worst_max_abs": i * 1e-9}})
                          for i in range(cells)])

    history = History(sys.argv[1])
    history.write_run(run(1, 3))
    calls = [0]

    def stall():
        calls[0] += 1
        if calls[0] == 50:  # well inside the big transaction
            print("writing", flush=True)
            time.sleep(60)
        return 0

    history.db.set_progress_handler(stall, 1000)
    history.write_run(run(2, 20000))
    print("written", flush=True)
''')


def test_a_writer_killed_mid_transaction_leaves_the_history_readable(tmp_path):
    path = tmp_path / "h.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(root=str(PROJECT_ROOT)))
    writer = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    with History(path) as history:
        assert history.run_ids() == ["run-0001"], "the killed run is absent, the earlier one whole"
        assert len(history.load_run("run-0001").cells) == 3
        assert history.write_run(make_run(3))


# -- regressions -------------------------------------------------------------------------------------
def test_five_unchanged_runs_flag_nothing():
    runs = [make_run(n) for n in range(1, 7)]
    for n in range(2, 7):
        comparison = compare(runs[n - 1], list(reversed(runs[: n - 1]))[:7], agreement={"toy": {"AP": 0.001}})
        assert comparison.changes == [], comparison.render()


def test_a_twenty_percent_slowdown_is_flagged_with_its_p_values():
    baseline = [make_run(n) for n in range(5, 0, -1)]
    comparison = compare(make_run(6, speed=2.0 / 1.2), baseline)
    (change,) = comparison.regressions
    assert (change.kind, change.backend, change.mark) == ("speed", "openvino", "▼")
    assert re.search(r"speed-up (2\.0|1\.9)\dx -> 1\.[67]\dx \(-1[5-9]%\); between runs p=\S+e-\d+, earlier medians "
                     r"spread ±\d%; rounds: Mann-Whitney U p=\S+e-\d+, 20 vs 100 from 5 run\(s\); each of 1 cells at p<0.01$", change.message), change.message


def test_a_small_shift_is_not_flagged_however_significant():
    baseline = [make_run(n) for n in range(5, 0, -1)]
    assert compare(make_run(6, speed=2.0 * 0.97), baseline).changes == []


def test_a_speedup_gain_is_a_change_not_a_regression():
    comparison = compare(make_run(6, speed=2.5), [make_run(n) for n in range(5, 0, -1)])
    assert [c.mark for c in comparison.changes] == ["▲"] and not comparison.regressions


def _drifting_runs(levels, current):
    """Runs whose every round is tight (2 %) but whose level moves from run to run, as a loaded
    host's does; two speed cells, so that the between-run spread has its degrees of freedom."""
    def run(n, level):
        made = make_run(n, speed=2.0 * level)
        twin = make_run(100 + n, speed=1.5 * level).cells[0]
        twin.case = "net-b2"
        made.cells.append(twin)
        return made
    return run(len(levels) + 1, current), [run(n, lv) for n, lv in reversed(list(enumerate(levels, 1)))]


LEVELS = (1.0, 1.03, 0.97, 1.02, 0.98)  # the level moves ±2.5 % from run to run, as on a loaded host


def test_a_shift_within_the_run_to_run_spread_is_not_flagged_though_its_rounds_differ():
    from scipy.stats import mannwhitneyu

    current, baseline = _drifting_runs(LEVELS, 0.92)
    pooled = [x for run in baseline for x in run.cells[0].series["ratio_samples"]]
    assert mannwhitneyu(current.cells[0].series["ratio_samples"], pooled).pvalue < 1e-4, "the rank test alone would flag it"
    assert compare(current, baseline).changes == []


def test_a_twenty_percent_slowdown_stands_out_of_the_run_to_run_spread():
    current, baseline = _drifting_runs(LEVELS, 1.0 / 1.2)
    flagged = compare(current, baseline).regressions
    assert sorted(c.case for c in flagged) == ["net-b1", "net-b2"] and all(c.kind == "speed" for c in flagged)


def test_the_run_to_run_spread_needs_two_earlier_runs():
    assert compare(make_run(3, speed=1.0), [make_run(2)]).changes == []
    (change,) = compare(make_run(3, speed=1.0), [make_run(2), make_run(1)]).changes
    assert change.kind == "speed" and "from 2 run(s)" in change.message


def test_reused_verdicts_are_neither_compared_nor_pooled():
    def cached(run):
        for cell in run.cells:
            cell.figures["cached"] = 1.0
        return run

    # Five reused copies of one measurement would count it six times: only the fresh ones are pooled.
    baseline = [cached(make_run(1, seed=1)) for _ in range(5)] + [make_run(1, seed=1), make_run(2)]
    (change,) = compare(make_run(7, speed=1.0), baseline).changes
    assert "20 vs 40 from 2 run(s)" in change.message
    assert compare(cached(make_run(8, speed=1.0)), [make_run(1), make_run(2)]).changes == [], \
        "a reused verdict measured nothing"


def test_parity_drift_within_tolerance_is_flagged():
    comparison = compare(make_run(3, worst=2e-5), [make_run(2), make_run(1)])
    (change,) = comparison.regressions
    assert change.kind == "drift" and "1.00e-06 -> 2.00e-05" in change.message and "tolerance 1.0e-04" in change.message


def test_drift_among_noise_far_below_tolerance_is_not_flagged():
    assert compare(make_run(3, worst=5e-8), [make_run(2, worst=1e-9)]).changes == []


def test_an_accuracy_move_beyond_the_agreement_bound_is_flagged():
    comparison = compare(make_run(2, metric=0.70), [make_run(1)], agreement={"toy": {"AP": 0.01}})
    assert [(c.kind, c.gate) for c in comparison.regressions] == [("accuracy", "accuracy-agreement")]
    assert compare(make_run(2, metric=0.755), [make_run(1)], agreement={"toy": {"AP": 0.01}}).changes == []


def test_transitions_against_the_previous_run():
    failed = make_run(2, outcome="failed", detail="y: 3 elements out")
    (change,) = compare(failed, [make_run(1)]).changes
    assert change.kind == "newly-failing" and change.regression and "3 elements out" in change.message
    (back,) = compare(make_run(3), [failed, make_run(1)]).changes
    assert back.kind == "newly-passing" and not back.regression
    gone = make_run(4, outcome="skipped", detail="onnxruntime unavailable: not installed")
    (missing,) = compare(gone, [make_run(3)]).changes
    assert missing.kind == "unavailable" and missing.regression


def test_runs_of_another_host_class_or_versions_are_not_a_baseline(tmp_path):
    from tooling.history.regression import baseline_runs

    with History(tmp_path / "h.sqlite") as history:
        history.write_run(make_run(1))
        history.write_run(make_run(2, env={**ENV, "cpu_model": "Other CPU"}))
        history.write_run(make_run(3, env={**ENV, "versions": {"torch": "2.14.0"}}))
        history.write_run(make_run(4, env={**ENV, "host": "ci-2"}))  # same class: another identical host
        assert [r.run_id for r in baseline_runs(history, make_run(5))] == ["run-0004", "run-0001"]


def test_passes_of_one_invocation_share_its_session_and_others_stand_alone(tmp_path, monkeypatch):
    from tooling.history.session import SESSION_ENV, record_run

    path = tmp_path / "h.sqlite"

    def run(run_id: str, started: float):
        return record_run(path, run_id=run_id, started=started, exit_status=0, rootpath=tmp_path, threads=1, rows=[],
                          builds=[], agreement={})

    monkeypatch.setenv(SESSION_ENV, "nightly-1")
    assert run("parity", 1.0).session_id == "nightly-1"  # what the terminal's history line names
    run("benchmark", 2.0)
    monkeypatch.delenv(SESSION_ENV)
    run("by-hand", 3.0)
    with History(path) as history:
        assert history.session_run_ids("benchmark") == history.session_run_ids("parity") == ["parity", "benchmark"]
        assert history.load_run("parity").session_id == "nightly-1"
        assert history.session_run_ids("by-hand") == ["by-hand"] and history.load_run("by-hand").session == "by-hand"


def test_a_benchmark_pass_is_compared_with_the_last_benchmark_passes_not_the_parity_passes_between(tmp_path):
    from dataclasses import replace

    from tooling.history.regression import DEFAULT_WINDOW, baseline_runs
    from tooling.history.synthetic import generated_run, nightly_passes

    with History(tmp_path / "h.sqlite") as history:
        for n in range(1, DEFAULT_WINDOW + 3):
            for run in nightly_passes(generated_run(n, models=("gma",), samples_per_pass=2, pictures=False), f"night-{n}"):
                history.write_run(run)
        parity, bench = nightly_passes(generated_run(20, models=("gma",), samples_per_pass=2, pictures=False), "night-20")
        kinds = {"parity": parity, "benchmark": bench}
        for kind, run in kinds.items():
            baseline = [r.run_id for r in baseline_runs(history, run)]
            assert baseline == [f"generated-{n:05d}-{kind}" for n in range(DEFAULT_WINDOW + 2, 2, -1)], kind
        assert baseline_runs(history, replace(bench, cells=[])) == []  # a run of no gate has nothing to compare
