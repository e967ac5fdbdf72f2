"""ONNX export of each deformable-conv variant with both exporters; ORT / OpenVINO parity vs torch.

Fast tier: a standalone AdaptBlock (the only part that differs between variants) with dynamic
batch/H/W, and the full network through the TorchScript exporter at a small input.
Slow tier: the full network for every variant and exporter (each dynamo export takes 35-55 s here).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

from tooling import planning
from tooling.locations import Roots
from tooling.models.dekr import DEFORM_VARIANTS, INPUT_NAMES, OUTPUT_NAMES, export_extras
from tooling.models.dekr.deform_conv import ASCEND_DOMAIN, ASCEND_DOMAIN_VERSION
from tooling.models.dekr.network import AdaptBlock
from tooling.seeded import apply_seeded_weights
from tooling.workspace import Options, Workspace

pytestmark = [
    pytest.mark.dekr,
    # Raised from inside the legacy TorchScript exporter (pyproject filters its main notice).
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

GOLDEN = Path(__file__).resolve().parents[3] / "fixtures" / "dekr" / "golden"
EXPORTERS = ("torchscript", "dynamo")
OPSET = 20
# What each exporter of torch 2.13 writes; onnxruntime 1.31 reads IR <= 13.
EXPECTED_IR_VERSION = {"torchscript": 9, "dynamo": 10}
# The node that carries the deformable conv in each variant's graph.
DEFORM_NODE = {
    "grid_sample": ("", "GridSample"),
    "onnx_deformconv": ("", "DeformConv"),
    "ascend_deformable_conv2d": (ASCEND_DOMAIN, "DeformableConv2D"),
}
# The dynamo exporter takes seconds even for one block (tens of seconds for the network): the CPU
# tier covers it with TorchScript only, the nightly (slow) tier with both.
_EXPORTER_PARAMS = [pytest.param(e, marks=[pytest.mark.slow] if e == "dynamo" else []) for e in EXPORTERS]
BLOCK_EXPORT_CASES = [
    pytest.param(v, e, marks=[pytest.mark.slow] if e == "dynamo" else []) for v in DEFORM_VARIANTS for e in EXPORTERS
]


def export(
    model: torch.nn.Module, example: torch.Tensor, path: Path, variant: str, exporter: str,
    input_name: str, output_names: tuple[str, ...], dynamic: bool, opset: int = OPSET,
) -> onnx.ModelProto:
    kwargs = {"dynamo": exporter == "dynamo", "opset_version": opset, **export_extras(variant, exporter, opset)}
    if exporter == "dynamo":
        kwargs["external_data"] = False
        if dynamic:  # keyed by forward()'s argument name, which the ONNX input names here repeat
            kwargs["dynamic_shapes"] = {input_name: {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}}
    elif dynamic:
        kwargs["dynamic_axes"] = {input_name: {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=list(output_names),
                      **kwargs)
    return onnx.load(str(path))


def assert_file_contract(proto: onnx.ModelProto, variant: str, exporter: str) -> None:
    assert proto.ir_version == EXPECTED_IR_VERSION[exporter]
    expected_opsets = {"": OPSET}
    if variant == "ascend_deformable_conv2d":
        expected_opsets[ASCEND_DOMAIN] = ASCEND_DOMAIN_VERSION
    assert {o.domain: o.version for o in proto.opset_import} == expected_opsets
    node_kinds = {(n.domain, n.op_type) for n in proto.graph.node}
    assert DEFORM_NODE[variant] in node_kinds
    assert not {kind for name, kind in DEFORM_NODE.items() if name != variant} & node_kinds
    onnx.checker.check_model(proto)


Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


def onnxruntime_runner(path: Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, dict(feeds))


def openvino_runner(path: Path) -> Runner:
    import openvino as ov

    # OpenVINO defaults to bf16 on CPUs that have it; parity needs f32.
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = compiled(dict(feeds))
        return [results[output] for output in compiled.outputs]

    return run


# OpenVINO 2026.4 has no DeformConv; nothing here runs the Ascend node.
BACKENDS: dict[str, tuple[Callable[[Path], Runner], ...]] = {
    "grid_sample": (onnxruntime_runner, openvino_runner),
    "onnx_deformconv": (onnxruntime_runner,),
    "ascend_deformable_conv2d": (),
}


def torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = model(x)
    return [t.numpy() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


def assert_relative_close(got: list[np.ndarray], expected: list[np.ndarray], names: tuple[str, ...], tol: float) -> None:
    """Seeded weights inflate activations (~1e4), so errors are judged against each output's max."""
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape, name
        error = np.abs(a - b).max()
        assert error <= tol * np.abs(b).max(), f"{name}: max error {error}, max |ref| {np.abs(b).max()}"


# --- export_extras ---------------------------------------------------------------------------------

def test_export_extras_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="unknown deformable-conv variant"):
        export_extras("torchvision", "dynamo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown exporter"):
        export_extras("grid_sample", "tflite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="opset >= 19"):
        export_extras("onnx_deformconv", "dynamo", opset_version=17)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_grid_sample_needs_no_exporter_hooks(exporter: str) -> None:
    assert export_extras("grid_sample", exporter, 17) == {}


# --- AdaptBlock (fast) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adaptblock_golden() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "adaptblock_public.npz"))


@pytest.mark.parity
@pytest.mark.parametrize(("variant", "exporter"), BLOCK_EXPORT_CASES)
def test_adaptblock_export(
    variant: str, exporter: str, adaptblock_golden: dict[str, np.ndarray], tmp_path: Path
) -> None:
    block = apply_seeded_weights(AdaptBlock(deform_variant=variant))
    path = tmp_path / f"adaptblock_{variant}_{exporter}.onnx"
    proto = export(block, torch.from_numpy(adaptblock_golden["x"]), path, variant, exporter, "x", ("out",), dynamic=True)
    assert_file_contract(proto, variant, exporter)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 15 and all(isinstance(d, str) for d in dims[2:])
    if onnxruntime_runner not in BACKENDS[variant]:
        return
    run = onnxruntime_runner(path)
    (out,) = run({"x": adaptblock_golden["x"]})
    np.testing.assert_allclose(out, adaptblock_golden["out"], rtol=0, atol=1e-5)
    # A second, non-square shape and batch 2: the sampling grid must follow the input size.
    x = torch.randn(2, 15, 12, 20, generator=torch.Generator().manual_seed(5))
    (out,) = run({"x": x.numpy()})
    np.testing.assert_allclose(out, torch_outputs(block, x)[0], rtol=0, atol=2e-5)


def test_ascend_node_carries_the_seed_attributes(tmp_path: Path) -> None:
    """At the seed's opset 11, with the node and attributes spec §b describes."""
    block = apply_seeded_weights(AdaptBlock(deform_variant="ascend_deformable_conv2d"))
    proto = export(block, torch.randn(1, 15, 8, 8), tmp_path / "ascend.onnx", "ascend_deformable_conv2d",
                   "torchscript", "x", ("out",), dynamic=False, opset=11)
    assert {o.domain: o.version for o in proto.opset_import} == {"": 11, ASCEND_DOMAIN: ASCEND_DOMAIN_VERSION}
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 15, 8, 8]
    (node,) = [n for n in proto.graph.node if n.op_type == "DeformableConv2D"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"strides": [1, 1], "pads": [1, 1], "dilations": 1, "groups": 1, "deformable_groups": 1}
    assert list(node.input[:2]) == ["x", "adapt_conv.weight"]
    # The offset is [dx x9, dy x9, mask x9], concatenated on channels (layout unit-tested in test_port).
    (producer,) = [n for n in proto.graph.node if node.input[2] in n.output]
    assert producer.op_type == "Concat" and len(producer.input) == 3
    assert onnx.helper.get_attribute_value(producer.attribute[0]) == 1


@pytest.mark.parity
@pytest.mark.parametrize("exporter", _EXPORTER_PARAMS)
def test_adaptblock_grid_sample_runs_in_openvino(exporter: str, tmp_path: Path) -> None:
    block = apply_seeded_weights(AdaptBlock())
    path = tmp_path / f"adaptblock_{exporter}.onnx"
    export(block, torch.randn(1, 15, 16, 16), path, "grid_sample", exporter, "x", ("out",), dynamic=True)
    run = openvino_runner(path)
    for shape in ((1, 15, 16, 16), (2, 15, 12, 20)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
        (out,) = run({"x": x.numpy()})
        np.testing.assert_allclose(out, torch_outputs(block, x)[0], rtol=0, atol=2e-5)


# --- full network ----------------------------------------------------------------------------------

def check_full_network(
    seeded_dekr: Callable[[str], torch.nn.Module], variant: str, exporter: str, path: Path, shapes: tuple[tuple[int, int], ...],
    dynamic: bool, runner_factories: tuple[Callable[[Path], Runner], ...],
) -> None:
    model = seeded_dekr(variant)
    first = torch.randn(1, 3, *shapes[0], generator=torch.Generator().manual_seed(0))
    proto = export(model, first, path, variant, exporter, INPUT_NAMES[0], OUTPUT_NAMES, dynamic)
    assert_file_contract(proto, variant, exporter)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    del proto
    runners = [make_runner(path) for make_runner in runner_factories]
    for index, shape in enumerate(shapes):
        image = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(index))
        expected = torch_outputs(model, image)
        for run in runners:
            assert_relative_close(run({INPUT_NAMES[0]: image.numpy()}), expected, OUTPUT_NAMES, 1e-4)
    path.unlink()  # ~120 MB of weights per file


@pytest.mark.parity
def test_one_dynamic_graph_serves_every_bucket(tmp_path: Path) -> None:
    """What ATC's dynamic dims are given: the workspace exports H and W symbolic, traced at one
    size, and the same file must agree with torch at another (ORT only, to stay fast)."""
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options(weights="seeded"))
    handle = zoo.model("dekr")
    case = next(c for c in planning.cases(handle.spec) if c.profile == "smoke" and c.variant == "grid_sample")
    path = handle.onnx(case, dynamic_dims=("height", "width"))
    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, "height", "width"]
    run = onnxruntime_runner(path)
    model = handle.network("hrnet_dekr", "grid_sample")[0]
    for shape in ((64, 96), (96, 64)):
        image = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert_relative_close(run({INPUT_NAMES[0]: image.numpy()}), torch_outputs(model, image), OUTPUT_NAMES, 1e-4)


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize(("variant", "exporter"), BLOCK_EXPORT_CASES)
def test_network_export_static_128(
    seeded_dekr: Callable[[str], torch.nn.Module], variant: str, exporter: str, tmp_path: Path
) -> None:
    check_full_network(seeded_dekr, variant, exporter, tmp_path / "dekr.onnx", ((128, 128),), dynamic=False,
                       runner_factories=BACKENDS[variant])
