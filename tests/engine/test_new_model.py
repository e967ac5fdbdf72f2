"""Adding a model is one slice, one yaml and one short test module: prove it with a throw-away
model run through the real plugin in a separate pytest process."""
from __future__ import annotations

import json
import os
import textwrap
from xml.etree import ElementTree

import pytest

from tooling.model_spec import PROJECT_ROOT

pytest_plugins = ["pytester"]

# The toy model's parity, agreement and known-answer gates pass; skipped: the staged accuracy row
# (no data; one backend by default). Gates with nothing to check (no goldens, no upstream, no
# chains) have no row.
TOY_OUTCOMES = {"passed": 13, "skipped": 1}


def test_a_new_model_gets_every_gate_from_its_yaml(toy_project):
    report = toy_project.path / "matrix.json"
    junit = toy_project.path / "junit.xml"
    result = toy_project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-m", "not benchmark",
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
    assert not any("{" in value for _, value in named), "JUnit properties are flat strings"
    rows = json.loads(report.read_text())["rows"]
    cells = {(r["gate"], r["backend"], r["case"]) for r in rows if r["outcome"] == "passed"}
    assert ("onnx-vs-torch", "onnx", "doubler-smoke-b2-torchscript") in cells
    assert ("deployed-vs-onnx", "openvino", "doubler-smoke-b1-torchscript") in cells
    assert {("accuracy-agreement", "onnxruntime", "-"), ("accuracy-agreement", "openvino", "-")} <= cells
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


def test_a_renamed_gate_collects_the_same_rows(toy_project):
    """Gates are found by their @gate mark, not their name: an alias collects the same parameters
    and reports the same gate label."""
    (toy_project.path / "test_toynet.py").write_text(textwrap.dedent('''
        from tooling.conformance import ConformanceSuite

        class TestToy(ConformanceSuite):
            model = "toynet"
            test_renamed_parity = ConformanceSuite.test_deployed_matches_onnx
    '''))
    result = toy_project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "--collect-only", "-q",
        "--backends", "onnxruntime,openvino", "-o", "markers=toynet",
    )
    lines = [line.split("::")[-1] for line in result.outlines if "::" in line]
    original = sorted(line.split("[", 1)[1] for line in lines if line.startswith("test_deployed_matches_onnx["))
    renamed = sorted(line.split("[", 1)[1] for line in lines if line.startswith("test_renamed_parity["))
    assert original and original == renamed


def _ids(result) -> list[str]:
    return [line for line in result.outlines if "::" in line]


def test_plain_pytest_runs_the_cpu_tier_and_the_nightly_tier_is_asked_for(toy_project, toy_yaml):
    baseline = toy_project.path / "baselines" / "toynet.yaml"
    baseline.write_text(toy_yaml.replace("  smoke: {batch_sizes: [1, 2]}", "  smoke: {batch_sizes: [1, 2]}\n  deploy: {batch_sizes: [3], slow: true}"))
    common = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "--collect-only", "-q", "-o", "markers=toynet")
    plain = _ids(toy_project.runpytest_subprocess(*common))
    nightly = _ids(toy_project.runpytest_subprocess(*common, "--nightly"))
    only_slow = _ids(toy_project.runpytest_subprocess(*common, "-m", "slow"))
    assert plain and not any("deploy-b3" in i for i in plain)
    assert set(plain) < set(nightly) and any("deploy-b3" in i for i in nightly)
    assert only_slow and all("deploy-b3" in i for i in only_slow)


def test_required_backend_that_is_unavailable_fails_instead_of_skipping(toy_project):
    # No Ascend toolkit here: om is unavailable. Plain runs skip; a host that requires it fails.
    common = ("-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet",
              "-k", "deployed_matches_onnx and b1", "--backends", "onnxruntime,om", "--no-verdict-cache")
    toy_project.runpytest_subprocess(*common).assert_outcomes(passed=1, skipped=1)
    required = toy_project.runpytest_subprocess(*common, "--require-backends", "om")
    required.assert_outcomes(passed=1, failed=1)
    required.stdout.fnmatch_lines(["*om unavailable: *(required by --require-backends)*"])


def test_required_backend_that_ran_no_gate_fails_the_run(toy_project):
    result = toy_project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet",
        "-k", "onnx_matches_torch and b1", "--require-backends", "openvino",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*required backend openvino ran no gate: no selected test uses it*"])


def test_under_xdist_the_controller_gets_full_rows_and_junit_flat_properties(toy_project):
    report = toy_project.path / "matrix.json"
    junit = toy_project.path / "junit.xml"
    result = toy_project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-m", "not benchmark", "-n", "1",
        "--backends", "onnxruntime,openvino", f"--zoo-report={report}", "-o", "markers=toynet", f"--junitxml={junit}",
    )
    result.assert_outcomes(**TOY_OUTCOMES)  # the same verdicts as without xdist
    rows = json.loads(report.read_text())["rows"]
    figures = [r["results"] for r in rows if r["gate"] == "deployed-vs-onnx"]
    assert figures and all("worst_max_abs" in results[0] for results in figures)  # structured, from the worker
    properties = ElementTree.parse(junit).getroot().findall(".//testcase/properties/property")
    assert any(p.get("name") == "zoo.worst_max_abs" for p in properties)
    assert not any("{" in p.get("value") for p in properties)
