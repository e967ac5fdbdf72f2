"""What each deformable-conv variant's export holds, through the engine's exporter and backends.

- The whole network's graphs (the artifacts the conformance gates build and share through the
  cache): the variant's deform node, the yaml's opsets, the IR version each exporter writes.
- The standalone AdaptBlock (the only part that differs between variants), exported with symbolic
  batch, H and W and run on each CPU backend the yaml lists for the variant, against its golden
  and torch at a second shape; the Ascend node's attributes at the seed's opset 11.
- One graph with symbolic H and W (what ATC's dynamic dims are given) serving several shapes.

The whole network's numbers on every variant, exporter and backend are the gates' (onnx-vs-torch
and deployed-vs-onnx at the smoke and smoke_dynamo profiles), with the yaml's tolerances.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tooling import planning
from tooling.backends import BACKENDS
from tooling.backends.base import CompileRequest
from tooling.backends.cpu import TorchSession
from tooling.baseline import load_model_spec
from tooling.compare import assert_outputs_match
from tooling.export import export_onnx
from tooling.model_spec import Tolerance
from tooling.models.dekr import DEFORM_VARIANTS, export_extras
from tooling.models.dekr.deform_conv import ASCEND_DOMAIN, ASCEND_DOMAIN_VERSION
from tooling.models.dekr.network import AdaptBlock
from tooling.seeded import apply_seeded_weights
from tooling.workspace import Workspace

pytestmark = [
    pytest.mark.dekr,
    # Raised from inside the legacy TorchScript exporter (pyproject filters its main notice).
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

SPEC = load_model_spec("dekr")
NETWORK = SPEC.networks["hrnet_dekr"]
GOLDEN = SPEC.fixtures / "golden" / "adaptblock_public.npz"
EXPORTERS = ("torchscript", "dynamo")
BLOCK_OPSET = 20  # every variant's hook at a current opset; the seed's opset 11 is checked apart
# The node that carries the deformable conv in each variant's graph.
DEFORM_NODE = {
    "grid_sample": ("", "GridSample"),
    "onnx_deformconv": ("", "DeformConv"),
    "ascend_deformable_conv2d": (ASCEND_DOMAIN, "DeformableConv2D"),
}
CPU_BACKENDS = ("onnxruntime", "openvino")
# The block's values are O(1) (seeded 15-channel input): fp32 backends agree to ~1e-6.
BLOCK_TOLERANCE = {"out": Tolerance(atol=2e-5, rtol=0.0)}
# The dynamo exporter takes seconds even for one block (tens of seconds for the network): the CPU
# tier covers it with TorchScript only, the nightly (slow) tier with both.
BLOCK_EXPORT_CASES = [
    pytest.param(v, e, marks=[pytest.mark.slow] if e == "dynamo" else []) for v in DEFORM_VARIANTS for e in EXPORTERS
]


def expected_ir_version(exporter: str, opset: int) -> int:
    """What torch 2.13 writes (onnxruntime 1.31 reads IR <= 13): the dynamo exporter IR 10, the
    TorchScript one the lowest IR version that holds the opset."""
    if exporter == "dynamo":
        return 10
    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def assert_file_contract(proto: onnx.ModelProto, variant: str, exporter: str, opset: int) -> None:
    assert proto.ir_version == expected_ir_version(exporter, opset)
    expected_opsets = {"": opset}
    if variant == "ascend_deformable_conv2d":
        expected_opsets[ASCEND_DOMAIN] = ASCEND_DOMAIN_VERSION
    assert {o.domain: o.version for o in proto.opset_import} == expected_opsets
    node_kinds = {(n.domain, n.op_type) for n in proto.graph.node}
    assert DEFORM_NODE[variant] in node_kinds
    assert not {kind for name, kind in DEFORM_NODE.items() if name != variant} & node_kinds
    onnx.checker.check_model(proto)


def export_block(block: torch.nn.Module, x: np.ndarray, path: Path, variant: str, exporter: str, opset: int,
                 dynamic: bool = True) -> onnx.ModelProto:
    export_onnx(block, {"x": x}, ("out",), path, exporter=exporter, opset=opset,
                dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}} if dynamic else None,
                extras=export_extras(variant, exporter, opset))
    return onnx.load(str(path))


def load_on(backend: str, path: Path, request: CompileRequest):
    """The registry's ``backend`` loading an exported file, as a gate's session does."""
    return BACKENDS[backend]().load(path, request)


def block_request(path: Path, x: np.ndarray) -> CompileRequest:
    case = next(c for c in planning.cases(SPEC) if c.profile == "smoke")
    return CompileRequest(SPEC, case, {}, path, lambda: None, {"x": x})


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


# --- the whole network's graphs ----------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("case", [
    # Built by the gates in the tier they run in; the Ascend graph only for the nightly's OM.
    pytest.param(c, id=c.id, marks=[pytest.mark.slow] * (c.slow or c.variant == "ascend_deformable_conv2d"))
    for c in planning.cases(SPEC) if c.profile in ("smoke", "smoke_dynamo")
])
def test_variant_graph_holds_its_deform_node(zoo: Workspace, case) -> None:
    path = zoo.model("dekr").onnx(case)
    proto = onnx.load(str(path))
    opset = NETWORK.variant(case.variant).opset.get(case.exporter) or NETWORK.opset[case.exporter]
    assert_file_contract(proto, case.variant, case.exporter, opset)
    assert [o.name for o in proto.graph.output] == list(NETWORK.output_names)


# --- AdaptBlock ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adaptblock_golden() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN))


@pytest.mark.parity
@pytest.mark.parametrize(("variant", "exporter"), BLOCK_EXPORT_CASES)
def test_adaptblock_export(
    variant: str, exporter: str, adaptblock_golden: dict[str, np.ndarray], tmp_path: Path
) -> None:
    block = apply_seeded_weights(AdaptBlock(deform_variant=variant))
    x = adaptblock_golden["x"]
    path = tmp_path / f"adaptblock_{variant}_{exporter}.onnx"
    proto = export_block(block, x, path, variant, exporter, BLOCK_OPSET)
    assert_file_contract(proto, variant, exporter, BLOCK_OPSET)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 15 and all(isinstance(d, str) for d in dims[2:])
    # A second, non-square shape and batch 2: the sampling grid must follow the input size.
    other = torch.randn(2, 15, 12, 20, generator=torch.Generator().manual_seed(5)).numpy()
    torch_other = TorchSession(block, ["x"], ["out"]).run({"x": other})
    for backend in (b for b in CPU_BACKENDS if NETWORK.variant(variant).runs_on(b)):
        session = load_on(backend, path, block_request(path, x))
        assert_outputs_match(session.run({"x": x}), {"out": adaptblock_golden["out"]}, BLOCK_TOLERANCE,
                             f"AdaptBlock {variant}/{exporter} on {backend} vs {GOLDEN.name}")
        assert_outputs_match(session.run({"x": other}), torch_other, BLOCK_TOLERANCE,
                             f"AdaptBlock {variant}/{exporter} on {backend} vs torch at 2x15x12x20")


def test_ascend_node_carries_the_seed_attributes(tmp_path: Path) -> None:
    """At the seed's opset 11, with the node and attributes spec §b describes."""
    block = apply_seeded_weights(AdaptBlock(deform_variant="ascend_deformable_conv2d"))
    x = torch.randn(1, 15, 8, 8).numpy()
    proto = export_block(block, x, tmp_path / "ascend.onnx", "ascend_deformable_conv2d", "torchscript", 11,
                         dynamic=False)
    assert {o.domain: o.version for o in proto.opset_import} == {"": 11, ASCEND_DOMAIN: ASCEND_DOMAIN_VERSION}
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 15, 8, 8]
    (node,) = [n for n in proto.graph.node if n.op_type == "DeformableConv2D"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"strides": [1, 1], "pads": [1, 1], "dilations": 1, "groups": 1, "deformable_groups": 1}
    # The export wrapper names the block's parameters under "network."; the order is what ATC reads.
    assert node.input[0] == "x" and node.input[1].endswith("adapt_conv.weight")
    # The offset is [dx x9, dy x9, mask x9], concatenated on channels (layout unit-tested in test_port).
    (producer,) = [n for n in proto.graph.node if node.input[2] in n.output]
    assert producer.op_type == "Concat" and len(producer.input) == 3
    assert onnx.helper.get_attribute_value(producer.attribute[0]) == 1


# --- one graph for every bucket ----------------------------------------------------------------------

@pytest.mark.parity
def test_one_dynamic_graph_serves_every_bucket(zoo: Workspace) -> None:
    """What ATC's dynamic dims are given: the workspace exports H and W symbolic, traced at one
    size, and the same file must agree with torch at another (ONNX Runtime only, to stay fast)."""
    handle = zoo.model("dekr")
    case = next(c for c in planning.cases(SPEC) if c.profile == "smoke" and c.variant == "grid_sample")
    path = handle.onnx(case, dynamic_dims=("height", "width"))
    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, "height", "width"]
    session = load_on("onnxruntime", path, handle.compile_request(case))
    torch_session = TorchSession(handle.network("hrnet_dekr", "grid_sample")[0], NETWORK.input_names,
                                 NETWORK.output_names)
    for shape in ((64, 96), (96, 64)):
        feeds = {"image": torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(sum(shape))).numpy()}
        assert_outputs_match(session.run(feeds), torch_session.run(feeds),
                             planning.tolerances(SPEC, "hrnet_dekr", "onnxruntime"),
                             f"the dynamic-H/W graph at {shape} on onnxruntime vs torch")
