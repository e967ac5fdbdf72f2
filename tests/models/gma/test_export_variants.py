"""The two export variants' graphs (from the artifact cache the conformance gates fill) and the
goldens through ONNX Runtime at their own shapes (the golden gate runs them on torch, both variants)."""
from __future__ import annotations

from collections import Counter

import onnx
import pytest

from tooling.cli import main
from tooling.model_spec import Case
from tooling.weights import WeightsChoice
from tooling.workspace import Workspace

from .conftest import GOLDEN

pytestmark = [
    pytest.mark.gma,
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

ITERS, LEVELS, CORNERS = 6, 4, 4


def smoke_graph(zoo: Workspace, variant: str) -> onnx.ModelProto:
    """The smoke-size export the conformance gates use (built once, shared through the cache)."""
    opset = {"gather": 12, "grid_sample": 16}[variant]
    case = Case("gma", "gma", "smoke", 1, "torchscript", variant, False)
    path = zoo.model("gma").onnx(case, WeightsChoice(None, "public"))
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    return model


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def test_gather_variant_is_the_guides_opset_12_graph(zoo):
    """No GridSample (needs opset 16) and no Einsum: the four corners of every level and iteration
    are GatherElements, attention and aggregation MatMuls; InstanceNorm stays for keep_dtype."""
    ops = op_counts(smoke_graph(zoo, "gather"))
    assert ops["GridSample"] == 0 and ops["Einsum"] == 0
    assert ops["GatherElements"] == CORNERS * LEVELS * ITERS
    assert ops["InstanceNormalization"] == 15  # fnet: the ops keep.cfg holds in fp32
    assert ops["MatMul"] >= 2 + ITERS  # correlation, attention, one aggregation per iteration


def test_grid_sample_variant_samples_with_grid_sample(zoo):
    ops = op_counts(smoke_graph(zoo, "grid_sample"))
    assert ops["GridSample"] == LEVELS * ITERS
    assert ops["GatherElements"] == 0 and ops["Einsum"] == 0


def test_inputs_and_output_are_named_as_the_guide_deploys_them(zoo):
    graph = smoke_graph(zoo, "gather").graph
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, dims(i)) for i in graph.input] == [("image1", [1, 3, 128, 128]), ("image2", [1, 3, 128, 128])]
    assert [(o.name, dims(o)) for o in graph.output] == [("out1", [1, 2, 128, 128])]


@pytest.mark.slow
@pytest.mark.parametrize("golden", ["gma_public.npz", "gma_b2odd_public.npz", "gma_full_public.npz"])
def test_verify_golden_accepts_the_goldens_on_onnxruntime(golden, capsys):
    assert main(["verify-golden", "gma", "gma", str(GOLDEN / golden), "--backend", "onnxruntime"]) == 0
