"""What DEKR's upstream code imports from torchvision, for hosts where torchvision cannot be imported.

Upstream's AdaptBlock uses ``torchvision.ops.DeformConv2d``. No torchvision build matches the CPU
torch this project pins (see shared/research/toolchain.md), so the port-vs-upstream gate serves that
one class from an independent implementation: ONNX Runtime's ``DeformConv`` kernel (ONNX opset 19,
torchvision's offset layout), wrapped as a torch module with torchvision's constructor and
parameters. It deliberately shares nothing with the port's own deformable convolution
(``deform_conv.py``), so the gate still compares two implementations. Only the upstream import sees
it: ``UpstreamCheckout.import_module`` installs it for that checkout alone.
"""
from __future__ import annotations

import importlib.util
from functools import cache
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

DEFORM_CONV_OPSET = 19
# onnx 1.23 writes IR 14 by default; ORT 1.31 reads at most 13.
ORT_IR_VERSION = 10


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@cache
def _deform_conv_session(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                         dilation: tuple[int, int], groups: int, offset_groups: int, bias: bool) -> ort.InferenceSession:
    """One ONNX Runtime session per convolution geometry; weights are inputs, so layers share it."""
    names = ["X", "W", "offset"] + (["B"] if bias else [])
    node = helper.make_node(
        "DeformConv", names, ["Y"], kernel_shape=list(kernel), strides=list(stride),
        pads=[padding[0], padding[1], padding[0], padding[1]], dilations=list(dilation),
        group=groups, offset_group=offset_groups,
    )
    inputs = [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", "c", "h", "w"]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, ["o", "cg", kernel[0], kernel[1]]),
        helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["n", "k", "oh", "ow"]),
    ] + ([helper.make_tensor_value_info("B", TensorProto.FLOAT, ["o"])] if bias else [])
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", "o", "oh", "ow"])
    model = helper.make_model(
        helper.make_graph([node], "deform_conv_stand_in", inputs, [output]),
        opset_imports=[helper.make_opsetid("", DEFORM_CONV_OPSET)],
    )
    model.ir_version = ORT_IR_VERSION
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class OrtDeformConv2d(nn.Module):
    """``torchvision.ops.DeformConv2d`` (DCNv1: no mask) computed by ONNX Runtime's DeformConv.

    Same constructor, parameter names and shapes as torchvision's (``weight`` of shape
    (out, in / groups, kh, kw); ``bias`` registered as None when disabled), so upstream code and its
    checkpoints load unchanged. Inference only: outputs carry no gradient.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must divide by groups {groups}")
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("the ONNX Runtime stand-in serves DCNv1 only (no modulation mask)")
        taps = self.kernel_size[0] * self.kernel_size[1]
        if offset.shape[1] % (2 * taps):
            raise ValueError(f"offset has {offset.shape[1]} channels, not a multiple of 2 x {taps} kernel taps")
        session = _deform_conv_session(self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
                                       offset.shape[1] // (2 * taps), self.bias is not None)
        feeds = {"X": input, "W": self.weight, "offset": offset}
        if self.bias is not None:
            feeds["B"] = self.bias
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32) for k, v in feeds.items()}
        (out,) = session.run(["Y"], arrays)
        return torch.from_numpy(out).to(input.dtype)


def torchvision_stand_ins() -> dict[str, tuple[ModuleType, str]]:
    """Modules to serve in place of torchvision for the upstream import; none if torchvision works."""
    reason = "torchvision is not installed"
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision.ops  # noqa: F401

            return {}
        except Exception as exc:  # a CUDA-only build fails at import time (toolchain.md)
            reason = f"torchvision does not import ({type(exc).__name__}: {exc})"
    description = (
        f"torchvision.ops.DeformConv2d served by ONNX Runtime {ort.__version__} DeformConv "
        f"(opset {DEFORM_CONV_OPSET}), not by upstream's torchvision: {reason}"
    )
    package = ModuleType("torchvision")
    package.__path__ = []  # a package, so ``import torchvision.ops`` resolves through sys.modules
    ops = ModuleType("torchvision.ops")
    ops.DeformConv2d = OrtDeformConv2d
    package.ops = ops
    return {"torchvision": (package, description), "torchvision.ops": (ops, description)}
