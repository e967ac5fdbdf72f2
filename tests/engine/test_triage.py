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
from tooling.triage import (TriageUnsupported, estimated_bytes, first_divergence,
                            memory_budget_bytes, node_outputs, triage_case)
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


# -- a memory budget per run -----------------------------------------------------------------------

class Recording:
    """A runner that keeps, per run, the intermediates it returned (the graph output aside)."""

    def __init__(self, runner):
        self.runner, self.runs = runner, []

    def __call__(self, path: Path):
        session = self.runner(path)
        recording = self

        class Session:
            def run(self, feeds):
                result = session.run(feeds)
                recording.runs.append({name: value.nbytes for name, value in result.items() if name != "y"})
                return result
        return Session()


def test_a_budget_exposes_the_graph_a_run_at_a_time_and_names_the_same_node(tmp_path):
    """At 70 bytes per run (h1, h2: 64 bytes each; h3, y: 24) the intermediates go out in three runs,
    none holding more than the budget, and the fault in the second MatMul is still the one named;
    the search stops at the run that holds it."""
    feeds = {"x": np.abs(np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32))}
    faulty = scaled_initializer("w2", 1.5)
    whole = first_divergence(chain_model(), feeds, ort(False), lambda path: ort(True)(faulty(path)), TIGHT, "chain")
    reference = Recording(ort(False))
    budgeted = first_divergence(chain_model(), feeds, reference, lambda path: ort(True)(faulty(path)), TIGHT, "chain",
                                budget_bytes=70)
    assert whole.runs == 1 and whole.first.output.node == "second_matmul"
    assert budgeted.first.output == whole.first.output and budgeted.compared == whole.compared == 3
    assert [sorted(run) for run in reference.runs] == [["h1"], ["h2"], ["h3"]]
    assert all(sum(run.values()) <= 70 for run in reference.runs)
    assert budgeted.runs == 3 and "in 3 runs of at most 0 MB of intermediates each" in budgeted.summary()
    assert budgeted.as_dict()["runs"] == 3 and budgeted.as_dict()["budget_bytes"] == 70

    sound = first_divergence(chain_model(), feeds, ort(False), ort(True), TIGHT, "chain", budget_bytes=70)
    assert sound.first is None and sound.compared == 4 and sound.runs == 3


def test_sizes_are_estimated_at_the_feeds_shapes_and_carried_past_unknown_ones():
    """A dynamic batch is pinned to the feeds' (5 rows: h1 is 5 x 8 float32 = 160 bytes); after an op
    shape inference cannot follow (a custom domain), the last known size stands in (h3 and y are
    5 x 3, 60 bytes, but nothing says so)."""
    model = chain_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.node.insert(2, helper.make_node("Mystery", ["h2"], ["m"], name="mystery", domain="vendor"))
    model.graph.node[3].input[0] = "m"
    model.opset_import.append(helper.make_opsetid("vendor", 1))
    outputs = node_outputs(model)
    sizes = estimated_bytes(model, {"x": np.zeros((5, 4), np.float32)}, outputs)
    assert [o.tensor for o in outputs] == ["h1", "h2", "m", "h3", "y"]
    assert sizes == [160, 160, 160, 160, 160]


def test_the_budget_comes_from_the_environment_or_the_free_memory(monkeypatch):
    monkeypatch.setenv("ZOO_TRIAGE_MEMORY_MB", "0.5")
    assert memory_budget_bytes() == 2**19
    for bad in ("lots", "0"):
        monkeypatch.setenv("ZOO_TRIAGE_MEMORY_MB", bad)
        with pytest.raises(ValueError, match=f"ZOO_TRIAGE_MEMORY_MB={bad!r}: (not a number of megabytes|must be positive)"):
            memory_budget_bytes()
    monkeypatch.delenv("ZOO_TRIAGE_MEMORY_MB")
    free = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert 0.5 * free / 6 < memory_budget_bytes() < 1.5 * free / 6


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
@pytest.mark.parametrize("budget_mb", [None, "0.25"])
def test_injected_fault_in_videopose3d_names_exactly_that_node(vp3d, monkeypatch, budget_mb):
    """A Conv in the middle of the temporal network computes 2 % too much on the candidate: the
    triage names that Conv, not an earlier node and not only the graph output; the same when the
    intermediates go out a quarter megabyte at a time."""
    handle, case = vp3d
    if budget_mb:
        monkeypatch.setenv("ZOO_TRIAGE_MEMORY_MB", budget_mb)
    convs = conv_nodes(handle, case)
    target = convs[len(convs) // 2]
    report = triage_case(handle, case, "onnxruntime", perturb=scaled_initializer(target.input[1], 1.02))
    assert report.first is not None, report.summary()
    assert (report.runs > 1) == bool(budget_mb), report.runs
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
@pytest.mark.parametrize("budget_mb", [None, "0.25"])
def test_onnx_vs_torch_fault_names_the_torch_module_and_its_node(vp3d, monkeypatch, budget_mb):
    """onnx-vs-torch: the export probing every submodule output computes one Conv 2 % too large
    (as a wrong export of that op would): that Conv's module and node are named; the same when the
    probes go out a quarter megabyte (one export) at a time."""
    handle, case = vp3d
    if budget_mb:
        monkeypatch.setenv("ZOO_TRIAGE_MEMORY_MB", budget_mb)
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
    assert (report.runs > 1) == bool(budget_mb), report.runs


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
