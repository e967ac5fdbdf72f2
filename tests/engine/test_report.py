"""The terminal's conformance grid, flat JUnit properties and the JSON report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tooling.jsonio import strict_json, to_json, write_json
from tooling.gates import GATES
from tooling.report import ConformanceMatrix, MatrixRow, flat_properties

OM_REASON = "atc not on PATH (source set_env.sh)"
CUDA_REASON = "torch 2.13.0+cpu is a CPU-only build"


def row(gate, backend, case, outcome="passed", detail="", **result) -> MatrixRow:
    return MatrixRow("toy", gate, backend, case, outcome, detail, results=[result] if result else [],
                     kind=GATES[gate].kind)


def unavailable_row(gate, backend, case, reason, selected=True) -> MatrixRow:
    """A row the plugin skipped for its backend, as it records one."""
    detail = f"{backend} unavailable: {reason}" if selected else f"{backend} not selected: {reason}"
    return MatrixRow("toy", gate, backend, case, "skipped", detail, kind=GATES[gate].kind,
                     unavailable={"reason": reason, "selected": selected})


def speedup_row(outcome="passed") -> MatrixRow:
    results = [
        {"throughput": {"backend": "torch", "rate": 480.0, "peak_fraction": 0.27}},
        {"throughput": {"backend": "onnxruntime", "rate": 996.0, "peak_fraction": 0.56}},
        {"throughput": {"backend": "openvino", "rate": 1253.0, "peak_fraction": 0.7}},
        {"speedups": {"onnxruntime": 2.07, "openvino": 2.61}, "best": "openvino", "floor": 1.3},
    ]
    return MatrixRow("toy", "cpu-speedup", "best-cpu", "net-b1", outcome,
                     "" if outcome == "passed" else "best deployed CPU backend 1.1x; floor 1.3x", results=results,
                     kind="speedup")


def matrix(*rows) -> ConformanceMatrix:
    m = ConformanceMatrix()
    for r in rows:
        m.add(r)
    return m


def test_grid_has_one_row_per_gate_and_case_and_one_column_per_backend():
    lines = matrix(
        row("onnx-vs-torch", "onnx", "net-b1", worst_max_abs=2.4e-6),
        row("deployed-vs-onnx", "onnxruntime", "net-b1", worst_max_abs=1.1e-6),
        row("deployed-vs-onnx", "openvino", "net-b1", worst_max_abs=3.0e-5),
        row("deployed-vs-onnx", "openvino", "net-b4", "failed", "net-b4: openvino vs ONNX: out max_abs 0.3 > 1e-4"),
        row("accuracy-known-answer", "onnxruntime", "-", metrics={"AP": 1.0, "AP/easy": 1.0}, metric="AP"),
        speedup_row(),
    ).render()
    text = "\n".join(lines)
    assert lines[0] == "[toy]"
    header = lines[1].split()
    assert header == ["gate", "case", "torch", "onnx", "onnxruntime", "openvino"]
    grid = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:8]}
    assert grid[("deployed-vs-onnx", "net-b1")] == [".", ".", "1e-6", "3e-5"]
    assert grid[("deployed-vs-onnx", "net-b4")] == [".", ".", ".", "FAIL"]
    assert grid[("onnx-vs-torch", "net-b1")] == [".", "2e-6", ".", "."]
    assert grid[("accuracy-known-answer", "-")] == [".", ".", "1", "."]
    assert grid[("cpu-speedup", "net-b1")] == ["1x", ".", "2.07x", "56%", "2.61x", "70%"]
    assert "FAILED toy deployed-vs-onnx openvino net-b4: net-b4: openvino vs ONNX: out max_abs 0.3 > 1e-4" in text
    assert "total: 5 passed, 1 failed, 0 skipped" in text


def test_agreement_cells_show_how_far_the_backend_moved_a_metric_not_the_metric():
    lines = matrix(
        row("accuracy-agreement", "onnxruntime", "-", metrics={"EPE": 33.25}, metric_deltas={"EPE": 2e-6, "1px": 0.0}),
        row("accuracy-agreement", "openvino", "-", metrics={"EPE": 33.25}, metric_deltas={"EPE": 0.0}),
    ).render()
    assert lines[2].split() == ["accuracy-agreement", "-", "Δ2e-6", "Δ0"]


def test_backends_unavailable_here_fold_into_one_line_per_reason():
    lines = matrix(
        row("deployed-vs-onnx", "onnxruntime", "net-b1", worst_max_abs=1e-6),
        unavailable_row("deployed-vs-onnx", "om", "net-b1", OM_REASON),
        unavailable_row("deployed-vs-onnx", "onnxruntime-cuda", "net-b1", CUDA_REASON),
        unavailable_row("deployed-vs-onnx", "torch-cuda", "net-b1", CUDA_REASON),
        row("accuracy", "onnxruntime", "-", "skipped", "toy accuracy needs staged inputs: /data/x"),
    ).render()
    assert lines[1].split() == ["gate", "case", "onnxruntime"]  # no column for what cannot run here
    assert f"not on this host: onnxruntime-cuda, torch-cuda: {CUDA_REASON}" in lines
    assert f"not on this host: om: {OM_REASON}" in lines
    assert "  skipped x1: toy accuracy needs staged inputs" in lines  # other skips still counted by reason
    assert "total: 1 passed, 0 failed, 4 skipped (3 on backends not on this host)" in lines
    assert not any("skipped x" in line and "unavailable" in line for line in lines)
    grid = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:4]}
    assert grid[("accuracy", "-")] == ["skip"]


def test_a_backend_left_out_with_backends_is_not_listed_as_missing_from_this_host():
    lines = matrix(
        row("deployed-vs-onnx", "openvino", "net-b1", worst_max_abs=1e-6),
        unavailable_row("accuracy-known-answer", "onnxruntime", "-", "--backends openvino", selected=False),
        unavailable_row("deployed-vs-onnx", "om", "net-b1", OM_REASON),
    ).render()
    assert lines[1].split() == ["gate", "case", "openvino"]
    assert "not selected: onnxruntime: --backends openvino" in lines
    assert f"not on this host: om: {OM_REASON}" in lines
    assert not any(line.startswith("not on this host") and "onnxruntime" in line for line in lines)
    assert "total: 1 passed, 0 failed, 2 skipped (1 on backends not on this host)" in lines


def test_an_accuracy_cell_shows_the_gated_metric_not_the_first_one():
    lines = matrix(row("accuracy", "onnxruntime", "-", metrics={"AP .5": 0.97, "AP": 0.7412}, metric="AP")).render()
    assert lines[2].split() == ["accuracy", "-", "0.7412"]


def test_a_failed_speed_gate_marks_its_best_backend():
    lines = matrix(speedup_row("failed")).render()
    assert lines[2].split()[2:] == ["1x", "2.07x", "56%", "FAIL", "2.61x", "70%"]


def test_junit_properties_are_flat_strings():
    flat = flat_properties({"model": "toy", "gate": "cpu-speedup", "backend": "best-cpu", "case": "net-b1"}, "passed",
                           speedup_row().results + [{"attempts": [{"onnxruntime": 1.2}]}])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat)
    props = dict(flat)
    assert props["zoo.gate"] == "cpu-speedup" and props["zoo.outcome"] == "passed"
    assert props["zoo.throughput.openvino.rate"] == "1253.0"
    assert props["zoo.speedups.onnxruntime"] == "2.07" and props["zoo.attempts.0.onnxruntime"] == "1.2"
    assert len(props) == len(flat)  # no key written twice


def test_json_report_keeps_every_row_in_full(tmp_path):
    m = matrix(speedup_row(), row("deployed-vs-onnx", "om", "net-b1", "skipped", f"om unavailable: {OM_REASON}"))
    m.write_json(tmp_path / "r.json")
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["rows"][0]["results"] == speedup_row().results
    assert payload["rows"][1]["detail"] == f"om unavailable: {OM_REASON}"


def _strict_loads(text: str):
    """Parse as a strict reader (JavaScript, jq) would: a bare NaN or Infinity token is an error."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_json_report_is_strict_json_with_non_finite_figures_flagged(tmp_path):
    m = matrix(row("accuracy", "onnxruntime", "-", "failed", "AP is NaN",
                   metrics={"AP": float("nan"), "AR": float("inf"), "AP50": np.float32(0.5)}))
    m.write_json(tmp_path / "r.json")
    payload = _strict_loads((tmp_path / "r.json").read_text())
    assert payload["rows"][0]["results"][0]["metrics"] == {"AP": None, "AR": None, "AP50": 0.5}
    assert payload["nonfinite"] == {"rows.0.results.0.metrics.AP": "nan", "rows.0.results.0.metrics.AR": "inf"}


def test_strict_json_converts_numpy_and_refuses_unknown_types_without_a_default(tmp_path):
    cleaned, replaced = strict_json({"a": np.arange(3), "b": [np.float64(-np.inf), True], "c": None})
    assert cleaned == {"a": [0, 1, 2], "b": [None, True], "c": None} and replaced == {"b.0": "-inf"}
    assert to_json([1.0, float("nan")]) == "[1.0, null]"  # a list cannot carry the flag: strict_json says where
    with pytest.raises(TypeError, match=r"x\.0: a object"):
        to_json({"x": [object()]})
    assert _strict_loads(to_json({"p": Path("/a")}, default=str)) == {"p": "/a"}
    write_json(tmp_path / "w.json", {"v": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]  # no temporary left behind
