"""The staged dataset pass on torch eager (``--accuracy-backend torch``, the reference pipeline) and a
deployed pass over the same staged set showing how far it moved each gated metric from it, in the
run's output, grid cell and JSON report; the default backends a staged pass runs on, per host.

End to end: child pytest runs of the toy model (tests/engine/conftest.py) on its known-answer set,
staged as data and weights roots. The reference pass, the stored figures, the moves and their
report are the engine's and know no model; a real network would only make each pass slower (the
accuracy-agreement rows of tests/models compare every real model's deployed score with torch's).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tooling.accuracy import REFERENCE_BACKEND, moves_against_reference, run_accuracy
from tooling.accuracy import REFERENCE_BACKEND, moves_against_reference, run_accuracy
from tooling.gates import default_accuracy_backends
from tooling.models.videopose3d.slice import write_known_answer
from tooling.workspace import ModelHandle

pytest_plugins = ["pytester"]

# A quick look on the first samples: figures and moves are recorded as for a full pass (and
# compared only with a pass over the same samples), the target not gated.
SAMPLES = 2


def _staged_pass(project, answer, name: str, *options: str):
    report = project.path / f"{name}.json"
    done = project.runpytest_subprocess(
        "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-o", "markers=toynet", "-s",
        "-m", "accuracy", "-k", "staged", "--history", "none",
        "--data-root", str(answer.data_root), "--weights-root", str(answer.weights_root),
        f"--zoo-report={report}", "--accuracy-limit", str(SAMPLES), *options)
    rows = json.loads(report.read_text())["rows"] if report.is_file() else []
    staged = [r for r in rows if r.get("gate") == "accuracy"]
    assert len(staged) == 1, done.stdout.str()[-3000:] + done.stderr.str()[-3000:]
    assert done.ret == pytest.ExitCode.OK, done.stdout.str()[-3000:]
    return done.stdout.str(), staged[0]


def _results(row: dict) -> dict:
    merged: dict = {}
    for result in row.get("results", []):
        merged.update(result)
    return merged


@pytest.mark.accuracy
def test_reference_pass_then_a_deployed_pass_shows_its_move(toy_project, toy_known_answer):
    answer = toy_known_answer(toy_project)
    reference, row = _staged_pass(toy_project, answer, "reference", "--accuracy-backend", "torch")
    assert "staged accuracy on torch eager, the reference pipeline" in reference
    assert row["backend"] == "torch" and f"quick look on the first {SAMPLES} samples" in row["detail"]
    torch_peak = _results(row)["metrics"]["mean_peak"]

    deployed, row = _staged_pass(toy_project, answer, "deployed")  # the host's default: ONNX Runtime here
    assert "staged accuracy on onnxruntime by default (no NPU here" in deployed
    assert row["backend"] == "onnxruntime"
    results = _results(row)
    assert results["reference_metrics"]["mean_peak"] == torch_peak
    move = results["moves_vs_reference"]["mean_peak"]
    assert move == results["metrics"]["mean_peak"] - torch_peak and abs(move) < 1e-5
    assert "onnxruntime moved mean_peak" in deployed
    grid_line = next(line for line in deployed.splitlines() if line.strip().startswith("accuracy "))
    assert " Δ" in grid_line, grid_line

    _, row = _staged_pass(toy_project, answer, "reference-again", "--accuracy-backend", "torch")
    assert set(_results(row)["deployed_moves"]) == {"onnxruntime"}  # the reference row lists the stored moves


@pytest.mark.accuracy
@pytest.mark.videopose3d
def test_sharded_passes_show_the_move_an_unsharded_pass_shows(zoo, tmp_path):
    """``--accuracy-shards`` merges find the reference and are found by it: a sharded torch eager
    pass is the reference of a deployed pass, whole or sharded, and a sharded deployed pass
    records the same move against it as the whole pass (one lookup, ``stored_metrics``)."""
    answer = write_known_answer(tmp_path / "staged")
    workspace = zoo.with_roots(data_root=answer.data_root, weights_root=answer.weights_root, cache_dir=tmp_path / "cache")
    # The staged pass at the smoke shape (2 x 400 frames) instead of the yaml's deploy one (2 x
    # 6115): every pass, lookup and fingerprint read the same profile, and the deploy shape only
    # made each of the three passes (and the export) fifteen times slower.
    spec = workspace.model("videopose3d").spec
    handle = ModelHandle(workspace, replace(spec, accuracy=replace(spec.accuracy, profile="smoke")))
    deployed = "onnxruntime"
    assert moves_against_reference(handle, deployed, {"mpjpe_p1_mm": 1.0}, SAMPLES) == {}  # nothing stored yet

    reference = run_accuracy(handle, REFERENCE_BACKEND, limit=SAMPLES, shards=2)
    sharded = run_accuracy(handle, deployed, limit=SAMPLES, shards=2)
    moved = moves_against_reference(handle, deployed, sharded, SAMPLES)
    assert moved["reference_metrics"] == reference
    assert moved["moves_vs_reference"]["mpjpe_p1_mm"] == sharded["mpjpe_p1_mm"] - reference["mpjpe_p1_mm"]
    whole = run_accuracy(handle, deployed, limit=SAMPLES)
    assert whole == sharded and moves_against_reference(handle, deployed, whole, SAMPLES) == moved
    listed = moves_against_reference(handle, REFERENCE_BACKEND, reference, SAMPLES)["deployed_moves"]
    assert listed == {deployed: moved["moves_vs_reference"]}
    # A quick look and the full pass keep their merges apart: the full set has no reference yet.
    assert moves_against_reference(handle, deployed, sharded, None) == {}


def test_default_staged_backends_per_host():
    deployed = ["onnxruntime", "openvino", "aoti", "om"]

    def host(*names):
        asked = []
        return (lambda name: asked.append(name) or name in names), asked

    npu, asked = host("onnxruntime", "openvino", "om")
    assert default_accuracy_backends(deployed, npu) == ["om"] and asked == ["om"]
    cpu, asked = host("onnxruntime", "openvino", "aoti")
    assert default_accuracy_backends(deployed, cpu) == ["onnxruntime"] and asked == ["om", "onnxruntime"]
    assert default_accuracy_backends(deployed, host("openvino")[0]) == ["openvino"]
    assert default_accuracy_backends(deployed, host()[0]) == ["onnxruntime"]  # it will skip, saying why
