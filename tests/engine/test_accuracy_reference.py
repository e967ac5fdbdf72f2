"""The staged dataset pass on torch eager (``--accuracy-backend torch``, the reference pipeline) and a
deployed pass over the same staged set showing how far it moved each gated metric from it, in the
run's output, grid cell and JSON report; the default backends a staged pass runs on, per host.

End to end: child pytest runs of the VideoPose3D suite on its generated set, written in the staged
layout (Human3.6M-like npz files and a hand-built checkpoint), with the real network exported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tooling.accuracy import REFERENCE_BACKEND, moves_against_reference, run_accuracy
from tooling.gates import default_accuracy_backends
from tooling.models.videopose3d.slice import write_known_answer

PROJECT = Path(__file__).resolve().parents[2]
# A quick look on the first sequences keeps each pass to seconds: figures and moves are recorded
# as for a full pass (and compared only with a pass over the same samples), the target not gated.
SEQUENCES = 2


def _staged_pass(answer, tmp_path: Path, name: str, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-s",
         "tests/models/test_videopose3d.py", "-m", "videopose3d and accuracy", "-k", "staged",
         "--data-root", str(answer.data_root), "--weights-root", str(answer.weights_root),
         "--cache-dir", str(tmp_path / "cache"), "--zoo-report", str(report), "--accuracy-limit", str(SEQUENCES),
         *options],
        cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=900,
    )
    rows = json.loads(report.read_text())["rows"] if report.is_file() else []
    staged = [r for r in rows if r.get("gate") == "accuracy"]
    assert len(staged) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done, staged[0]


def _results(row: dict) -> dict:
    merged: dict = {}
    for result in row.get("results", []):
        merged.update(result)
    return merged


@pytest.mark.accuracy
@pytest.mark.videopose3d
def test_reference_pass_then_a_deployed_pass_shows_its_move(tmp_path):
    answer = write_known_answer(tmp_path / "staged")
    reference, row = _staged_pass(answer, tmp_path, "reference", "--accuracy-backend", "torch")
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    assert "staged accuracy on torch eager, the reference pipeline" in reference.stdout
    assert row["backend"] == "torch" and "quick look on the first 2 samples" in row["detail"]
    torch_mpjpe = _results(row)["metrics"]["mpjpe_p1_mm"]

    deployed, row = _staged_pass(answer, tmp_path, "deployed")  # the host's default: ONNX Runtime here
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert "staged accuracy on onnxruntime by default (no NPU here" in deployed.stdout
    assert row["backend"] == "onnxruntime"
    results = _results(row)
    assert results["reference_metrics"]["mpjpe_p1_mm"] == torch_mpjpe
    move = results["moves_vs_reference"]["mpjpe_p1_mm"]
    assert move == results["metrics"]["mpjpe_p1_mm"] - torch_mpjpe and abs(move) < 0.1
    assert "onnxruntime moved mpjpe_p1_mm" in deployed.stdout
    grid_line = next(line for line in deployed.stdout.splitlines() if line.strip().startswith("accuracy "))
    assert " Δ" in grid_line, grid_line

    again, row = _staged_pass(answer, tmp_path, "reference-again", "--accuracy-backend", "torch")
    assert again.returncode == 0
    assert set(_results(row)["deployed_moves"]) == {"onnxruntime"}  # the reference row lists the stored moves


@pytest.mark.accuracy
@pytest.mark.videopose3d
def test_sharded_passes_show_the_move_an_unsharded_pass_shows(zoo, tmp_path):
    """``--accuracy-shards`` merges find the reference and are found by it: a sharded torch eager
    pass is the reference of a deployed pass, whole or sharded, and a sharded deployed pass
    records the same move against it as the whole pass (one lookup, ``stored_metrics``)."""
    answer = write_known_answer(tmp_path / "staged")
    handle = zoo.with_roots(data_root=answer.data_root, weights_root=answer.weights_root,
                            cache_dir=tmp_path / "cache").model("videopose3d")
    deployed = "onnxruntime"
    assert moves_against_reference(handle, deployed, {"mpjpe_p1_mm": 1.0}, SEQUENCES) == {}  # nothing stored yet

    reference = run_accuracy(handle, REFERENCE_BACKEND, limit=SEQUENCES, shards=2)
    sharded = run_accuracy(handle, deployed, limit=SEQUENCES, shards=2)
    moved = moves_against_reference(handle, deployed, sharded, SEQUENCES)
    assert moved["reference_metrics"] == reference
    assert moved["moves_vs_reference"]["mpjpe_p1_mm"] == sharded["mpjpe_p1_mm"] - reference["mpjpe_p1_mm"]
    whole = run_accuracy(handle, deployed, limit=SEQUENCES)
    assert whole == sharded and moves_against_reference(handle, deployed, whole, SEQUENCES) == moved
    listed = moves_against_reference(handle, REFERENCE_BACKEND, reference, SEQUENCES)["deployed_moves"]
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
