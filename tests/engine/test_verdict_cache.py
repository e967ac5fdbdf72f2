"""The verdict cache through the real plugin, on the toy model in a separate pytest process: a
second run reuses every pass and says so (grid, JSON, JUnit, summary); what changed, failed,
was damaged or asked to be recomputed is recomputed. tests/engine/test_verdict_key.py proves, input
by input over the five real models, which keys change."""
from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

pytest_plugins = ["pytester"]

COMMON = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet",
          "--backends", "onnxruntime,openvino")
PARITY = (*COMMON, "-m", "not benchmark")
GATE_PASSES = 13  # the toy's passing rows (tests/engine/test_new_model.py TOY_OUTCOMES)


def _run(project, *args, report: str = "matrix.json", junit: str | None = None):
    extra = (f"--zoo-report={project.path / report}",) + ((f"--junitxml={project.path / junit}",) if junit else ())
    return project.runpytest_subprocess(*args, *extra)


def _assert_outcomes(result, **expected: int) -> None:
    """Like ``RunResult.assert_outcomes``, with the ``cached`` count of the summary line."""
    counted = {k: v for k, v in result.parseoutcomes().items() if k in ("passed", "cached", "failed", "skipped", "errors")}
    assert counted == expected, result.stdout.str()[-3000:]


def _rows(project, report: str = "matrix.json") -> list[dict]:
    return json.loads((project.path / report).read_text())["rows"]


def _entries(tmp_path) -> list[dict]:
    return [json.loads(p.read_text())["entry"] for p in sorted((tmp_path / "cache" / "verdicts").rglob("*.json"))]


def _with_a_slice_test(project) -> Path:
    """A test below tests/models/ outside the gate registry, reading a fixture file: its table."""
    (project.path / "tests" / "models" / "toynet").mkdir(parents=True)
    (project.path / "fixtures" / "toynet").mkdir(parents=True)
    table = project.path / "fixtures" / "toynet" / "table.txt"
    table.write_text("2\n")
    (project.path / "tests" / "models" / "toynet" / "test_table.py").write_text(
        "import os\n"
        "def test_table_doubles():\n"
        "    assert int(open(os.environ['ZOO_FIXTURES_DIR'] + '/toynet/table.txt').read()) == 2\n")
    return table


def test_an_unchanged_second_run_reuses_every_pass_and_labels_it(toy_project, tmp_path):
    """One toy project through the runs a developer makes, each a process start: every pass of
    an unchanged input is reused and labelled (gates, the speed row within --verdict-cache-max-age,
    and a slice's own test below tests/models/ while every file the suite reads is unchanged);
    --verdict-cache-max-age, --no-verdict-cache and --nightly recompute what they say; a slice
    test is recomputed when a fixture file changes and always runs when something is staged; an
    edit to the slice's file recomputes its gates, a failure is never stored, and a damaged entry is
    recomputed with its reason printed."""
    table = _with_a_slice_test(toy_project)
    passes = GATE_PASSES + 1  # the gates and the slice's own test
    cold = _run(toy_project, *PARITY, "-n", "1", report="cold.json")  # stored from an xdist worker
    skips = cold.parseoutcomes().get("skipped", 0)  # no staged data
    _assert_outcomes(cold, passed=passes, skipped=skips)
    entries = _entries(tmp_path)
    assert len(entries) == passes, "one entry per pass; skips are never stored"
    runs = {e["run"] for e in entries}
    assert len(runs) == 1 and all(e["commit"] for e in entries)
    (cold_run,) = runs

    # Every row now, the speed-up's too: the stored passes are reused, the speed row is computed
    warm = _run(toy_project, *COMMON, "-p", "no:xdist", report="warm.json", junit="warm.xml")
    _assert_outcomes(warm, passed=1, cached=passes, skipped=skips)  # the skips are recomputed: never cached
    warm.stdout.fnmatch_lines([f"*{passes} verdict(s) reused, labelled cached*",
                               "*deployed-vs-onnx*doubler-smoke-b1-torchscript*0†*0†",
                               f"total: {GATE_PASSES + 1} passed ({GATE_PASSES} cached †)*"])
    cold_rows = {r["nodeid"]: r for r in _rows(toy_project, "cold.json")}
    warm_rows = _rows(toy_project, "warm.json")
    assert {r["gate"] for r in warm_rows if r["outcome"] == "passed" and not r["cached"]} == {"cpu-speedup"}
    for row in warm_rows:
        if row["outcome"] == "passed" and row["gate"] != "cpu-speedup":
            assert row["cached"]["run"] == cold_run
            assert row["results"] == cold_rows[row["nodeid"]]["results"], "the stored figures, unchanged"
            assert {row["gate"], row["backend"]} == {cold_rows[row["nodeid"]]["gate"], cold_rows[row["nodeid"]]["backend"]}
        else:
            assert row["cached"] is None
    assert json.loads((toy_project.path / "warm.json").read_text())["counts"]["cached"] == GATE_PASSES
    properties = ElementTree.parse(toy_project.path / "warm.xml").getroot().findall(".//testcase/properties")
    flagged = [{p.get("name"): p.get("value") for p in case} for case in properties]
    cached = [p for p in flagged if p.get("zoo.verdict") == "cached"]  # the slice's own test's too
    assert len(cached) == passes and all(p["zoo.cached.run"] and p["zoo.cached.commit"] for p in cached)

    durations = json.loads((tmp_path / "cache" / "durations.json").read_text())
    assert all(durations[e["nodeid"]] >= round(e["seconds"], 2) for e in entries), \
        "a reused verdict keeps its computing time for longest-first scheduling"

    speed = (*COMMON, "-p", "no:xdist", "-m", "benchmark")  # the CPU tier's one cpu-speedup row (smoke b1)
    _assert_outcomes(_run(toy_project, *speed), cached=1)  # within the max age (default 24 h)
    expired = _run(toy_project, *COMMON, "-p", "no:xdist", "--verdict-cache-max-age", "0")
    _assert_outcomes(expired, passed=1, cached=passes, skipped=skips)  # the age bounds speed verdicts only
    expired.stdout.fnmatch_lines(["*cached speed verdict is * h old (--verdict-cache-max-age 0), recomputed*"])

    again = _run(toy_project, *PARITY, "--no-verdict-cache", report="again.json")
    _assert_outcomes(again, passed=passes, skipped=skips)
    verdicts = lambda name: {(r["nodeid"], r["outcome"]) for r in _rows(toy_project, name)}  # noqa: E731
    assert verdicts("again.json") == verdicts("cold.json"), "--no-verdict-cache reproduces the cold verdicts"
    assert not any(r["cached"] for r in _rows(toy_project, "again.json"))
    nightly = _run(toy_project, *speed, "-k", "b1", "--nightly")  # the nightly recomputes everything
    _assert_outcomes(nightly, passed=1)

    slice_tests = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet", "tests/models")
    table.write_text("3\n")  # a fixture file: recomputed (and now failing)
    _assert_outcomes(toy_project.runpytest_subprocess(*slice_tests), failed=1)
    table.write_text("2\n")
    staged = toy_project.runpytest_subprocess(*slice_tests, "--weights-root", str(tmp_path))
    _assert_outcomes(staged, passed=1)  # a staged root is not hashed: the test runs

    # Edits, failures and damage, on the passes stored above
    slice_file = toy_project.path / "toyslice.py"  # a known answer wrong by one: that gate fails
    slice_file.write_text(slice_file.read_text().replace('{"mean_peak": expected}', '{"mean_peak": expected + 1}'))
    gates = (*PARITY, "-k", "onnx_matches_torch or deployed_matches or known_answer")
    _assert_outcomes(_run(toy_project, *gates, report="edited.json"), passed=6, failed=1)  # any edit to the slice's file
    edited_run = json.loads((toy_project.path / "edited.json").read_text())["run"]["id"]
    path = next(p for p in sorted((tmp_path / "cache" / "verdicts").rglob("*.json"))
                if json.loads(p.read_text())["entry"]["run"] == edited_run and '"worst_max_abs": 0.0' in p.read_text())
    path.write_text(path.read_text().replace('"worst_max_abs": 0.0', '"worst_max_abs": 1e-09'))
    damaged = _run(toy_project, *gates)
    _assert_outcomes(damaged, passed=1, cached=5, failed=1)  # the failure is never cached
    damaged.stdout.fnmatch_lines(["*damaged cache entry, recomputed: *checksum does not match*",
                                  "FAILED *known_answer*"])


def test_a_bad_max_age_is_a_usage_error(pytester):
    """Refused when the run configures, before any test: in this process (only the option's
    plugin is loaded, and it keeps no state), since nothing here depends on a fresh one."""
    result = pytester.runpytest_inprocess("-p", "tooling.verdict_plugin", "--verdict-cache-max-age", "soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--verdict-cache-max-age 'soon'*"])
