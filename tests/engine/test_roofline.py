"""Roofline figures: FLOPs counted from ONNX graphs against hand counts, the host peak, the hook."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tooling.report import ThroughputEntry
from tooling.roofline import graph_flops, host_peak_gflops


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def test_each_counted_op_matches_its_hand_count():
    # x [2,3,8,8] -> Conv 3->4, 3x3, pad 1 -> [2,4,8,8] -> Relu -> ConvTranspose 4->5, 2x2 stride 2
    # -> [2,5,16,16] -> Reshape [2,1280] -> Gemm with W [1280,6] (transB=0) -> MatMul [6,7] -> [2,7]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "w_deconv"], ["d"], strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Reshape", ["d", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm"], ["g"]),
        helper.make_node("MatMul", ["g", "w_mm"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("w_conv", 4, 3, 3, 3), _weight("w_deconv", 4, 5, 2, 2), _weight("w_gemm", 1280, 6),
         _weight("w_mm", 6, 7), numpy_helper.from_array(np.array([2, 1280], np.int64), "flat")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counted = graph_flops(model, {"x": (2, 3, 8, 8)})
    conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)  # each output: Cin x kh x kw multiply-adds
    relu = 2 * 4 * 8 * 8
    deconv = 2 * (2 * 4 * 8 * 8) * (5 * 2 * 2)  # each input element feeds Cout x kh x kw outputs
    gemm = 2 * (2 * 6) * 1280 + 2 * 6  # plus the C / alpha-beta term per output
    matmul = 2 * (2 * 7) * 6
    assert counted.by_op == {"Conv": conv, "Relu": relu, "ConvTranspose": deconv, "Gemm": gemm, "MatMul": matmul}
    assert counted.total == conv + relu + deconv + gemm + matmul and not counted.uncounted


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's own
def test_videopose3d_deploy_call_is_about_407_gflop(tmp_path):
    """The guide's call: 2 sequences x 6115 frames. Hand count from the spec (a.): valid temporal
    convolutions, 1024 channels; expand (34->1024, k3), four blocks of a dilated k3 conv (d = 3, 9,
    27, 81, each shortening the sequence by 2d) and a 1x1 conv, then shrink (1024->51)."""
    from tooling.models.videopose3d.network import build_vp3d

    lengths = [6115 - 2]
    for dilation in (3, 9, 27, 81):
        lengths.append(lengths[-1] - 2 * dilation)
    macs_per_sequence = (
        lengths[0] * 1024 * 34 * 3
        + sum(length * 1024 * 1024 * (3 + 1) for length in lengths[1:])
        + lengths[-1] * 51 * 1024
    )
    hand_conv_flop = 2 * 2 * macs_per_sequence
    assert hand_conv_flop / 1e9 == pytest.approx(407, abs=2)

    # Export at the shortest input with a dynamic frame axis; count at the deploy shape.
    path = tmp_path / "vp3d.onnx"
    torch.onnx.export(build_vp3d().eval(), (torch.zeros(1, 243, 17, 2),), str(path), input_names=["2d_poses"],
                      output_names=["3d_preds"], opset_version=11, dynamo=False,
                      dynamic_axes={"2d_poses": {0: "batch", 1: "frames"}})
    counted = graph_flops(path, {"2d_poses": (2, 6115, 17, 2)})
    assert counted.by_op["Conv"] == hand_conv_flop  # BatchNorm folded into the convs' bias
    assert counted.total == pytest.approx(hand_conv_flop, rel=0.005)  # Relu and residual Adds on top
    assert not counted.uncounted


def test_a_graph_input_without_a_shape_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(ValueError, match=r"no shape given for graph inputs \['x'\]"):
        graph_flops(helper.make_model(graph), {})


def test_host_peak_is_measured_once_per_thread_count():
    host_peak_gflops.cache_clear()
    first = host_peak_gflops(1)
    assert first > 0 and host_peak_gflops(1) == first
    assert host_peak_gflops.cache_info().hits == 1


def test_the_cached_peak_is_the_best_of_several_processes_then_measured_no_more(tmp_path, monkeypatch):
    from tooling import roofline

    readings = iter([40.0, 95.0, 60.0])  # the first process ran on a loaded host
    measured = []
    monkeypatch.setattr(roofline, "measure_gemm_peak", lambda threads: measured.append(threads) or next(readings))
    seen = []
    for _ in range(roofline.PEAK_MEASUREMENTS + 2):  # each a new process: the in-process cache is cleared
        host_peak_gflops.cache_clear()
        seen.append(host_peak_gflops(2, tmp_path))
    assert seen == [40.0, 95.0, 95.0, 95.0, 95.0] and measured == [2, 2, 2]
    (stored,) = (tmp_path / "probes").glob("host-gemm-peak-*.json")
    assert '"threads": 2' in stored.read_text()
    host_peak_gflops.cache_clear()
    monkeypatch.setattr(roofline, "measure_gemm_peak", lambda threads: 77.0)
    assert host_peak_gflops(1, tmp_path) == 77.0  # another thread count is another key
    stored.write_text("{ damaged")
    host_peak_gflops.cache_clear()
    assert host_peak_gflops(2, tmp_path) == 77.0  # a damaged entry is measured again, not trusted
    host_peak_gflops.cache_clear()


def test_a_rate_above_the_measured_peak_says_the_peak_was_measured_low():
    from tooling.report import MatrixRow, cell_texts

    entry = ThroughputEntry("m", "c", "openvino", "cpu", rate=100.0, unit="fps", mean_s=0.1, best_s=0.1)
    entry.attach_roofline(flop_per_call=18e9, peak_gflops=100.0)  # 180 GFLOP/s on a "100 GFLOP/s" host
    assert entry.achieved_gflops == 180.0 and entry.peak_fraction is None
    assert entry.peak_note == "peak measured low: 180.0 GFLOP/s achieved > 100.0 measured"
    torch_entry = ThroughputEntry("m", "c", "torch", "cpu", rate=50.0, unit="fps", mean_s=0.2, best_s=0.2)
    torch_entry.attach_roofline(flop_per_call=18e9, peak_gflops=100.0)
    assert torch_entry.peak_fraction == 0.9 and torch_entry.peak_note is None
    row = MatrixRow("m", "cpu-speedup", "openvino", "c", "passed", kind="speedup", results=[
        {"speedups": {"openvino": 2.0}, "best": "openvino"},
        {"throughput": entry.as_dict()}, {"throughput": torch_entry.as_dict()}])
    assert cell_texts(row)["openvino"] == "2.00x >peak"
    # A row recorded before the note existed (a cached verdict) is not printed as 180 % either.
    old = {**entry.as_dict(), "peak_fraction": 1.8, "peak_note": None}
    row.results[1] = {"throughput": old}
    assert cell_texts(row)["openvino"] == "2.00x >peak"


def test_throughput_entry_carries_roofline_figures():
    entry = ThroughputEntry("m", "c", "onnxruntime", "cpu", rate=100.0, unit="fps", mean_s=0.5, best_s=0.4)
    entry.attach_roofline(flop_per_call=20e9, peak_gflops=80.0)
    assert (entry.gflop_per_call, entry.achieved_gflops, entry.peak_fraction) == (20.0, 40.0, 0.5)
    device = ThroughputEntry("m", "c", "om", "310P3", rate=1.0, unit="fps", mean_s=2.0, best_s=2.0)
    device.attach_roofline(flop_per_call=4e9, peak_gflops=None)
    assert device.achieved_gflops == 2.0 and device.peak_fraction is None
