"""The verdict cache through the real plugin, on the toy model in a separate pytest process: a
second run reuses every pass and says so (grid, JSON, JUnit, summary); what changed, failed,
was damaged or asked to be recomputed is recomputed. tests/engine/test_verdict_key.py proves, input
by input over the five real models, which keys change."""
from __future__ import annotations

import json
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


def test_an_unchanged_second_run_reuses_every_pass_and_labels_it(toy_project, tmp_path):
    cold = _run(toy_project, *PARITY, "-n", "1", report="cold.json")  # stored from an xdist worker
    skips = cold.parseoutcomes().get("skipped", 0)  # no staged data
    _assert_outcomes(cold, passed=GATE_PASSES, skipped=skips)
    entries = _entries(tmp_path)
    assert len(entries) == GATE_PASSES, "one entry per pass; skips are never stored"
    runs = {e["run"] for e in entries}
    assert len(runs) == 1 and all(e["commit"] for e in entries)
    (cold_run,) = runs

    warm = _run(toy_project, *PARITY, report="warm.json", junit="warm.xml")
    _assert_outcomes(warm, cached=GATE_PASSES, skipped=skips)  # the skips are recomputed: never cached
    warm.stdout.fnmatch_lines([f"*{GATE_PASSES} verdict(s) reused, labelled cached*",
                               "*deployed-vs-onnx*doubler-smoke-b1-torchscript*0†*0†",
                               f"total: {GATE_PASSES} passed ({GATE_PASSES} cached †)*"])
    cold_rows = {r["nodeid"]: r for r in _rows(toy_project, "cold.json")}
    warm_rows = _rows(toy_project, "warm.json")
    for row in warm_rows:
        if row["outcome"] == "passed":
            assert row["cached"]["run"] == cold_run
            assert row["results"] == cold_rows[row["nodeid"]]["results"], "the stored figures, unchanged"
            assert {row["gate"], row["backend"]} == {cold_rows[row["nodeid"]]["gate"], cold_rows[row["nodeid"]]["backend"]}
        else:
            assert row["cached"] is None
    assert json.loads((toy_project.path / "warm.json").read_text())["counts"]["cached"] == GATE_PASSES
    properties = ElementTree.parse(toy_project.path / "warm.xml").getroot().findall(".//testcase/properties")
    flagged = [{p.get("name"): p.get("value") for p in case} for case in properties]
    cached = [p for p in flagged if p.get("zoo.verdict") == "cached"]
    assert len(cached) == GATE_PASSES and all(p["zoo.cached.run"] and p["zoo.cached.commit"] for p in cached)

    durations = json.loads((tmp_path / "cache" / "durations.json").read_text())
    assert all(durations[e["nodeid"]] >= round(e["seconds"], 2) for e in entries), \
        "a reused verdict keeps its computing time for longest-first scheduling"

    again = _run(toy_project, *PARITY, "--no-verdict-cache", report="again.json")
    _assert_outcomes(again, passed=GATE_PASSES, skipped=skips)
    verdicts = lambda name: {(r["nodeid"], r["outcome"]) for r in _rows(toy_project, name)}  # noqa: E731
    assert verdicts("again.json") == verdicts("cold.json"), "--no-verdict-cache reproduces the cold verdicts"
    assert not any(r["cached"] for r in _rows(toy_project, "again.json"))


def test_damaged_entries_edits_and_failures_are_recomputed(toy_project, tmp_path):
    slice_file = toy_project.path / "toyslice.py"  # a known answer wrong by one: that gate fails
    slice_file.write_text(slice_file.read_text().replace('{"mean_peak": expected}', '{"mean_peak": expected + 1}'))
    args = (*PARITY, "-k", "onnx_matches_torch or deployed_matches or known_answer")
    _assert_outcomes(_run(toy_project, *args), passed=6, failed=1)
    path = sorted((tmp_path / "cache" / "verdicts").rglob("*.json"))[0]
    path.write_text(path.read_text().replace('"worst_max_abs": 0.0', '"worst_max_abs": 1e-09'))
    second = _run(toy_project, *args)
    _assert_outcomes(second, passed=1, cached=5, failed=1)  # the failure is never cached
    second.stdout.fnmatch_lines(["*damaged cache entry, recomputed: *checksum does not match*",
                                 "FAILED *known_answer*"])
    slice_file.write_text(slice_file.read_text() + "\nEDITED = True\n")  # any edit to the slice's file
    _assert_outcomes(_run(toy_project, *args), passed=6, failed=1)


def test_speed_verdicts_are_reused_only_up_to_the_max_age(toy_project):
    # The CPU tier's one cpu-speedup row (smoke b1; the b2 row is nightly), no device throughput row
    args = (*COMMON, "-p", "no:xdist", "-m", "benchmark")
    _assert_outcomes(_run(toy_project, *args), passed=1)  # no device backend here: no throughput row
    _assert_outcomes(_run(toy_project, *args), cached=1)
    expired = _run(toy_project, *args, "--verdict-cache-max-age", "0")
    _assert_outcomes(expired, passed=1)
    expired.stdout.fnmatch_lines(["*cached speed verdict is * h old (--verdict-cache-max-age 0), recomputed*"])
    nightly = _run(toy_project, *args, "-k", "b1", "--nightly")  # the nightly recomputes everything
    _assert_outcomes(nightly, passed=1)


def test_a_slices_own_test_is_reused_until_anything_the_suite_reads_changes(toy_project, tmp_path):
    """A test below tests/models/ outside the gate registry: reused while every engine file,
    baseline, fixture and version is unchanged, never when something is staged (not hashed)."""
    (toy_project.path / "tests" / "models" / "toynet").mkdir(parents=True)
    (toy_project.path / "fixtures" / "toynet").mkdir(parents=True)
    table = toy_project.path / "fixtures" / "toynet" / "table.txt"
    table.write_text("2\n")
    (toy_project.path / "tests" / "models" / "toynet" / "test_table.py").write_text(
        "import os\n"
        "def test_table_doubles():\n"
        "    assert int(open(os.environ['ZOO_FIXTURES_DIR'] + '/toynet/table.txt').read()) == 2\n")
    args = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet", "tests/models",
            f"--junitxml={toy_project.path / 'junit.xml'}")
    _assert_outcomes(toy_project.runpytest_subprocess(*args), passed=1)
    _assert_outcomes(toy_project.runpytest_subprocess(*args), cached=1)
    properties = {p.get("name"): p.get("value") for p in
                  ElementTree.parse(toy_project.path / "junit.xml").getroot().iter("property")}
    assert properties["zoo.verdict"] == "cached" and properties["zoo.cached.run"]
    table.write_text("3\n")  # a fixture file: recomputed (and now failing)
    _assert_outcomes(toy_project.runpytest_subprocess(*args), failed=1)
    table.write_text("2\n")
    staged = toy_project.runpytest_subprocess(*args, "--weights-root", str(tmp_path))
    _assert_outcomes(staged, passed=1)  # a staged root is not hashed: the test runs


def test_a_bad_max_age_is_a_usage_error(pytester):
    """Refused when the run configures, before any test: in this process (only the option's
    plugin is loaded, and it keeps no state), since nothing here depends on a fresh one."""
    result = pytester.runpytest_inprocess("-p", "tooling.verdict_plugin", "--verdict-cache-max-age", "soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--verdict-cache-max-age 'soon'*"])
