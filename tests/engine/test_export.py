"""Export: one self-contained file, the requested opset or a clear error, always eval mode."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tooling.export import ExportError, export_onnx, opset_of


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.9)

    def forward(self, x):
        return {"y": self.drop(self.norm(self.conv(x))), "z": x.mean()}


FEEDS = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("exporter, opset", [("torchscript", 11), ("torchscript", 17), ("dynamo", 18)])
def test_export_is_single_file_eval_mode_at_requested_opset(tmp_path, exporter, opset):
    net = DropoutNet().train()  # a caller that forgot eval() must still get the deployed graph
    path = tmp_path / "m.onnx"
    export_onnx(net, FEEDS, ["y", "z"], path, exporter=exporter, opset=opset)
    assert opset_of(path) == opset
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y", "z"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], FEEDS)[0]
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(FEEDS["x"]))["y"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dynamo_below_opset_18_is_refused_not_silently_upgraded(tmp_path):
    with pytest.raises(ExportError, match="asked dynamo for opset 11 but the file declares opset 18"):
        export_onnx(DropoutNet(), FEEDS, ["y", "z"], tmp_path / "m.onnx", exporter="dynamo", opset=11)


def test_unknown_exporter(tmp_path):
    with pytest.raises(ExportError, match="unknown exporter 'tflite'"):
        export_onnx(DropoutNet(), FEEDS, ["y", "z"], tmp_path / "m.onnx", exporter="tflite", opset=17)


@pytest.mark.parametrize("exporter, opset", [("torchscript", 17), ("dynamo", 18)])
def test_dynamic_axes_give_one_graph_for_every_size(tmp_path, exporter, opset):
    net = torch.nn.Conv2d(3, 4, 3).eval()
    path = tmp_path / "m.onnx"
    axes = {"x": {0: "batch", 2: "height", 3: "width"}}
    export_onnx(net, FEEDS, ["y"], path, exporter=exporter, opset=opset, dynamic_axes=axes)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    other = np.random.default_rng(1).standard_normal((2, 3, 11, 9)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": other})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(torch.from_numpy(other)).numpy(), atol=1e-5)
