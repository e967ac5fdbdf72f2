"""CPU backends' own behaviour: OpenVINO's compile cache under the artifact cache."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tooling.backends.cpu import OpenVinoSession


def matmul_graph(path) -> None:
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_later_session_imports_the_compiled_graph_and_computes_the_same(tmp_path):
    path = tmp_path / "tiny.onnx"
    matmul_graph(path)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)}
    uncached = OpenVinoSession(path, 1, None).run(feeds)
    cache = tmp_path / "runtime" / "openvino"
    first = OpenVinoSession(path, 1, None, cache).run(feeds)
    blobs = sorted(p.name for p in cache.glob("*.blob"))
    assert blobs, "the first compile leaves its blob in the cache"
    second = OpenVinoSession(path, 1, None, cache).run(feeds)
    assert sorted(p.name for p in cache.glob("*.blob")) == blobs, "the second one imports it"
    for outputs in (first, second):
        np.testing.assert_array_equal(outputs["z"], uncached["z"])


def test_an_unwritable_cache_compiles_without_one(tmp_path):
    path = tmp_path / "tiny.onnx"
    matmul_graph(path)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    session = OpenVinoSession(path, 1, None, blocked / "openvino")
    assert session.run({"x": np.zeros((2, 16), np.float32)})["z"].shape == (2, 8)
