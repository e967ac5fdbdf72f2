"""Adding a model is one slice, one yaml and one short test module: prove it with a throw-away
model run through the real plugin in a separate pytest process."""
from __future__ import annotations

import json
import textwrap
from xml.etree import ElementTree

import pytest

pytest_plugins = ["pytester"]

# The toy model's parity, agreement and known-answer gates pass; skipped: the staged accuracy row
# (no data; one backend by default). Gates with nothing to check (no goldens, no upstream, no
# chains) have no row.
TOY_OUTCOMES = {"passed": 13, "skipped": 1}


def test_a_new_model_gets_every_gate_from_its_yaml(toy_project):
    """Run as CI runs it, under xdist (one worker): the controller gets the workers' full rows, with
    structured figures, for its grid, JSON report and JUnit properties. The same toy run without
    xdist gives the same verdicts (test_verdict_cache.py compares a -n 1 run with a plain one)."""
    report = toy_project.path / "matrix.json"
    junit = toy_project.path / "junit.xml"
    result = toy_project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-m", "not benchmark", "-n", "1",
        "--backends", "onnxruntime,openvino", f"--zoo-report={report}", "-o", "markers=toynet",
        f"--junitxml={junit}",
    )
    result.assert_outcomes(**TOY_OUTCOMES)
    result.stdout.fnmatch_lines([
        "*conformance grid*", "[[]toynet[]]", "*gate*case*onnx*onnxruntime*openvino",
        "*deployed-vs-onnx*doubler-smoke-b1-torchscript*.*0*0",
    ])
    properties = ElementTree.parse(junit).getroot().findall(".//testcase/properties/property")
    named = {(p.get("name"), p.get("value")) for p in properties}
    assert ("zoo.gate", "deployed-vs-onnx") in named and ("zoo.backend", "openvino") in named
    assert any(name == "zoo.worst_max_abs" for name, _ in named)
    assert not any("{" in value for _, value in named), "JUnit properties are flat strings"
    rows = json.loads(report.read_text())["rows"]
    cells = {(r["gate"], r["backend"], r["case"]) for r in rows if r["outcome"] == "passed"}
    assert ("onnx-vs-torch", "onnx", "doubler-smoke-b2-torchscript") in cells
    assert ("deployed-vs-onnx", "openvino", "doubler-smoke-b1-torchscript") in cells
    assert {("accuracy-agreement", "onnxruntime", "-"), ("accuracy-agreement", "openvino", "-")} <= cells
    figures = [r["results"] for r in rows if r["gate"] == "deployed-vs-onnx"]
    assert figures and all("worst_max_abs" in results[0] for results in figures)  # structured, from the worker
    skipped = {r["gate"]: r["detail"] for r in rows if r["outcome"] == "skipped"}
    assert "toynet/toy.pth" in skipped["accuracy"]


def _run_staged_gate(toy_project, answer):
    return toy_project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-m", "accuracy",
        "-k", "test_accuracy_on_staged_dataset", "--accuracy-backend", "onnxruntime",
        "--data-root", str(answer.data_root), "--weights-root", str(answer.weights_root), "-o", "markers=toynet",
    )


def test_staged_dataset_is_scored_and_gated(toy_project, toy_known_answer):
    answer = toy_known_answer(toy_project)
    assert answer.expected["mean_peak"] > 1.0  # the yaml's target
    result = _run_staged_gate(toy_project, answer)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*gate*case*onnxruntime*", f"*accuracy*-*{answer.expected['mean_peak']:.4g}*"])


def test_corrupt_staged_checkpoint_fails_naming_the_file(toy_project, toy_known_answer):
    answer = toy_known_answer(toy_project)
    (answer.weights_root / "toynet" / "toy.pth").write_bytes(b"\x80\x02 truncated")
    result = _run_staged_gate(toy_project, answer)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*CheckpointError: *toynet/toy.pth: not a readable torch checkpoint*"])


def _ids(result) -> list[str]:
    return [line for line in result.outlines if "::" in line]


def test_gates_are_found_by_mark_and_the_nightly_tier_is_asked_for(toy_project, toy_yaml):
    """Plain pytest collects the CPU tier; --nightly adds the slow profile's rows and -m slow
    selects them alone. Gates are found by their @gate mark, not their name: an alias collects the
    same parameters (one toy project for both, each collection a process start)."""
    (toy_project.path / "test_toynet.py").write_text(textwrap.dedent('''
        from tooling.conformance import ConformanceSuite

        class TestToy(ConformanceSuite):
            model = "toynet"
            test_renamed_parity = ConformanceSuite.test_deployed_matches_onnx
    '''))
    baseline = toy_project.path / "baselines" / "toynet.yaml"
    baseline.write_text(toy_yaml.replace("  smoke: {batch_sizes: [1, 2]}", "  smoke: {batch_sizes: [1, 2]}\n  deploy: {batch_sizes: [3], slow: true}"))
    common = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "--collect-only", "-q", "-o", "markers=toynet",
              "--backends", "onnxruntime,openvino")
    plain = _ids(toy_project.runpytest_subprocess(*common))
    nightly = _ids(toy_project.runpytest_subprocess(*common, "--nightly"))
    only_slow = _ids(toy_project.runpytest_subprocess(*common, "-m", "slow"))
    assert plain and not any("deploy-b3" in i for i in plain)
    assert set(plain) < set(nightly) and any("deploy-b3" in i for i in nightly)
    # -m slow: the nightly's own rows (the slow profile's, and the speed-up at a profile's later
    # batch sizes), none of the plain run's
    assert any("deploy-b3" in i for i in only_slow) and set(only_slow) == set(nightly) - set(plain)

    names = [i.split("::")[-1] for i in nightly]
    original = sorted(n.split("[", 1)[1] for n in names if n.startswith("test_deployed_matches_onnx["))
    renamed = sorted(n.split("[", 1)[1] for n in names if n.startswith("test_renamed_parity["))
    assert original and original == renamed


def test_required_backends_fail_where_a_plain_run_skips_or_runs_no_gate_of_theirs(toy_project):
    # No Ascend toolkit here: om is unavailable. A plain run skips its row; a host that requires
    # it fails the row. A required backend whose every row -k deselected fails the run, whose rows
    # all passed or skipped (so the exit status is that failure's alone).
    common = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet", "--no-verdict-cache")
    idle = toy_project.runpytest_subprocess(*common, "-k", "deployed_matches_onnx and b1 and not openvino",
                                            "--backends", "onnxruntime,om,openvino", "--require-backends", "openvino")
    idle.assert_outcomes(passed=1, skipped=1)
    assert idle.ret == pytest.ExitCode.TESTS_FAILED
    idle.stdout.fnmatch_lines(["*required backend openvino ran no gate: no selected test uses it*"])

    required = toy_project.runpytest_subprocess(*common, "-k", "deployed_matches_onnx and b1",
                                                "--backends", "onnxruntime,om", "--require-backends", "om")
    required.assert_outcomes(passed=1, failed=1)
    required.stdout.fnmatch_lines(["*om unavailable: *(required by --require-backends)*"])
