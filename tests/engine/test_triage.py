"""First-divergence triage: the first graph node out of tolerance between a reference run and a
backend is named, with its statistics and its feeding nodes, by the parity gates and the CLI."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tooling import planning
from tooling.backends.cpu import OrtSession
from tooling.cli import main
from tooling.compare import ComparisonError
from tooling.conformance import triaged
from tooling.locations import Roots
from tooling.model_spec import Tolerance
from tooling.triage import TriageUnsupported, first_divergence, node_outputs, triage_case
from tooling.workspace import Options, Workspace

VP3D_CASE = "vp3d-smoke-b2-torchscript"


def ort(optimize: bool):
    return lambda path: OrtSession(path, threads=1, optimize=optimize, providers=["CPUExecutionProvider"])


def scaled_initializer(name: str, factor: float):
    """Fault injection: the candidate loads the graph with one initializer scaled, as a backend
    whose kernel for the node consuming it miscomputes would."""
    def perturb(path: Path) -> Path:
        model = onnx.load(str(path))
        (init,) = [i for i in model.graph.initializer if i.name == name]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), name))
        faulty = path.with_name("faulty.onnx")
        onnx.save(model, str(faulty))
        return faulty
    return perturb


def chain_model() -> onnx.ModelProto:
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> Add(b) -> y, with named nodes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("w1", (4, 8)), ("w2", (8, 3)), ("b", (3,))]]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="first_matmul"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="second_matmul"),
        helper.make_node("Add", ["h3", "b"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


TIGHT = Tolerance(atol=1e-6, rtol=1e-6)


def test_node_outputs_follow_graph_order_and_name_their_feeds():
    outputs = node_outputs(chain_model())
    assert [(o.position, o.node, o.tensor) for o in outputs] == [
        (0, "first_matmul", "h1"), (1, "relu", "h2"), (2, "second_matmul", "h3"), (3, "bias", "y")]
    assert outputs[2].feeds_from == ("relu", "initializer:w2")
    assert outputs[0].feeds_from == ("input:x", "initializer:w1")


@pytest.mark.parametrize("initializer, node", [("w1", "first_matmul"), ("w2", "second_matmul"), ("b", "bias")])
def test_the_perturbed_node_is_the_one_named(tmp_path, initializer, node):
    feeds = {"x": np.abs(np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32))}
    faulty = scaled_initializer(initializer, 1.5)
    candidate = lambda path: ort(True)(faulty(path))  # noqa: E731
    report = first_divergence(chain_model(), feeds, ort(False), candidate, TIGHT, "chain")
    assert report.first is not None and report.first.output.node == node
    assert report.first.stats.violations > 0 and report.first.stats.max_abs > 0


def test_a_sound_backend_has_no_first_divergence():
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    report = first_divergence(chain_model(), feeds, ort(False), ort(True), TIGHT, "chain")
    assert report.first is None and report.compared == 4
    assert "no node output out of tolerance among 4 compared (of 4 nodes)" in report.summary()


# -- a real model's graph --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vp3d():
    # The project's artifact cache: the triage reads the case's exported graph, which the CPU
    # tier's VideoPose3D rows export anyway, and writes its perturbed copies to temporary folders.
    handle = Workspace(Roots.resolve(), Options(weights="seeded")).model("videopose3d")
    case = next(c for c in planning.cases(handle.spec) if c.id == VP3D_CASE)
    return handle, case


def conv_nodes(handle, case) -> list[onnx.NodeProto]:
    model = onnx.load(str(handle.onnx(case)))
    return [n for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.videopose3d
def test_injected_fault_in_videopose3d_names_exactly_that_node(vp3d):
    """A Conv in the middle of the temporal network computes 2 % too much on the candidate: the
    triage names that Conv, not an earlier node and not only the graph output."""
    handle, case = vp3d
    convs = conv_nodes(handle, case)
    target = convs[len(convs) // 2]
    report = triage_case(handle, case, "onnxruntime", perturb=scaled_initializer(target.input[1], 1.02))
    assert report.first is not None, report.summary()
    assert report.first.output.node == target.name and report.first.output.op_type == "Conv"
    assert report.first.output.feeds_from[1] == f"initializer:{target.input[1]}"
    summary = report.summary()
    assert f"first diverging node #{report.first.output.position} {target.name!r} (Conv)" in summary
    assert json.loads(json.dumps(report.as_dict()))["first_divergence"]["node"] == target.name


@pytest.mark.videopose3d
def test_failed_gate_message_and_report_name_the_first_diverging_node(vp3d, monkeypatch):
    handle, case = vp3d
    target = conv_nodes(handle, case)[1]
    import tooling.conformance as conformance

    real = conformance.triage_case
    monkeypatch.setattr(conformance, "triage_case", lambda h, c, b, feeds: real(
        h, c, b, feeds, perturb=scaled_initializer(target.input[1], 1.5)))
    request = SimpleNamespace(node=SimpleNamespace(user_properties=[]))
    error = triaged(ComparisonError("3d_preds out of tolerance"), request, handle, case, "onnxruntime", handle.feeds(case))
    assert str(error).startswith("3d_preds out of tolerance\nfirst-divergence triage")
    assert f"{target.name!r} (Conv)" in str(error)
    ((key, result),) = request.node.user_properties
    assert key == "zoo_result" and result["triage"]["first_divergence"]["node"] == target.name


@pytest.mark.videopose3d
def test_onnx_vs_torch_fault_names_the_torch_module_and_its_node(vp3d):
    """onnx-vs-torch: the export probing every submodule output computes one Conv 2 % too large
    (as a wrong export of that op would): that Conv's module and node are named."""
    handle, case = vp3d
    chosen = {}

    def faulty_export(path: Path) -> Path:
        model = onnx.load(str(path))
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        target = convs[len(convs) // 2]
        chosen["node"], chosen["weight"] = target.name, target.input[1]
        return scaled_initializer(target.input[1], 1.02)(path)

    report = triage_case(handle, case, "onnx", perturb=faulty_export)
    assert report.first is not None, report.summary()
    assert report.first.output.node == chosen["node"] and report.first.output.op_type == "Conv"
    assert report.first.output.module.startswith("layers_conv."), report.first.output.module
    assert chosen["weight"].endswith(report.first.output.module + ".weight")
    assert f"first diverging module {report.first.output.module!r}, computed by node" in report.summary()


def test_torch_is_no_backend_to_triage(vp3d):
    handle, case = vp3d
    with pytest.raises(TriageUnsupported, match="torch is the reference"):
        triage_case(handle, case, "torch")


@pytest.mark.videopose3d
def test_cli_triage_reports_and_writes_json(vp3d, tmp_path, capsys):
    handle, _ = vp3d
    out = tmp_path / "triage.json"
    code = main(["triage", "videopose3d", VP3D_CASE, "--backend", "onnxruntime", "--weights", "seeded",
                 "--cache-dir", str(handle.ws.roots.cache_dir), "--json", str(out)])
    assert code == 0, capsys.readouterr()
    assert "onnxruntime vs ONNX Runtime with no graph rewrites): no node output out of tolerance" in capsys.readouterr().out
    assert json.loads(out.read_text())["first_divergence"] is None
    assert main(["triage", "videopose3d", "nope", "--backend", "onnxruntime"]) == 2
    assert f"cases: {VP3D_CASE}" in capsys.readouterr().err


def test_constant_nodes_are_not_compared_their_consumers_are():
    """A Constant computes nothing (backends may narrow its dtype, e.g. int64 bounds to int32): a
    different constant shows up as a divergence of the node consuming it."""
    model = chain_model()
    model.graph.node.insert(3, helper.make_node("Constant", [], ["c"], name="offset", value=numpy_helper.from_array(np.ones(3, np.float32))))
    model.graph.node[4].input[1] = "c"

    def other_constant(path: Path):
        changed = onnx.load(str(path))
        changed.graph.node[3].attribute[0].t.CopyFrom(numpy_helper.from_array(np.full(3, 2.0, np.float32)))
        faulty = path.with_name("faulty.onnx")
        onnx.save(changed, str(faulty))
        return ort(False)(faulty)

    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    report = first_divergence(model, feeds, ort(False), other_constant, TIGHT, "chain")
    assert report.first.output.node == "bias" and report.first.output.feeds_from == ("second_matmul", "offset")
    assert report.compared == 4
