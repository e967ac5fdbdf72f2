"""DEKR's upstream gate without torchvision: the ONNX Runtime DeformConv stand-in and the builders.

The stand-in is checked against known deformable-convolution behaviour on its own (zero offsets are
a plain convolution, integer offsets a shifted one, the spec's golden AdaptBlock sampling), never
against the port's deform_conv module. The builders run on a generated checkout laid out as
upstream's (``lib/config`` yacs defaults, ``lib/models`` importing ``torchvision.ops``, experiment
yamls), written here in our own words: the real one cannot be downloaded on this host.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tooling.backends.cpu import TorchSession
from tooling.compare import assert_outputs_match
from tooling.locations import Roots
from tooling.models.dekr.slice import SLICE, UPSTREAM_EXPERIMENT, UPSTREAM_RESCORE_EXPERIMENT
from tooling.models.dekr.upstream_ops import OrtDeformConv2d, torchvision_stand_ins
from tooling.seeded import seeded_tensor
from tooling.sources import UpstreamSource
from tooling.weights import WeightsChoice
from tooling.workspace import Workspace

pytestmark = [pytest.mark.dekr]

GOLDEN = Path(__file__).resolve().parents[3] / "fixtures" / "dekr" / "golden"


def stand_in(in_ch: int, out_ch: int, bias: bool, groups: int = 1, seed: int = 0) -> OrtDeformConv2d:
    layer = OrtDeformConv2d(in_ch, out_ch, 3, padding=1, bias=bias, groups=groups)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(out_ch, generator=g))
    return layer


@pytest.mark.parametrize("bias, groups", [(False, 1), (True, 1), (True, 2)])
def test_zero_offsets_are_a_plain_convolution(bias, groups):
    layer = stand_in(4, 6, bias, groups)
    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    out = layer(x, torch.zeros(2, 18, 7, 9))
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1, groups=groups)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dy, dx", [(1, 0), (0, -2), (-3, 2)])
def test_integer_offsets_are_a_shifted_convolution(dy, dx):
    """Every tap displaced by (dy, dx) samples input(y - 1 + i + dy, x - 1 + j + dx), zero outside
    the map (the bilinear weights are exactly 0 and 1): an unpadded convolution of the zero-extended
    input, read at an origin moved by (dy, dx)."""
    layer = stand_in(3, 5, bias=True)
    x = torch.randn(1, 3, 8, 10, generator=torch.Generator().manual_seed(2))
    offset = torch.zeros(1, 18, 8, 10)
    offset[:, 0::2], offset[:, 1::2] = dy, dx
    pad = 5
    full = F.conv2d(F.pad(x, (pad, pad, pad, pad)), layer.weight, layer.bias)
    top, left = pad - 1 + dy, pad - 1 + dx
    expected = full[:, :, top : top + 8, left : left + 10]
    torch.testing.assert_close(layer(x, offset), expected.detach(), rtol=1e-5, atol=1e-5)


def test_reproduces_the_spec_golden_adaptblock_sampling():
    """The spec's deform_out came from the literal DCNv1 definition's grid_sample form; the stand-in
    gets it from ONNX Runtime given the golden's input, offsets and the seeded weight."""
    golden = np.load(GOLDEN / "adaptblock_public.npz")
    layer = OrtDeformConv2d(15, 15, kernel_size=3, stride=1, padding=1, dilation=1, bias=False, groups=1)
    with torch.no_grad():
        layer.weight.copy_(seeded_tensor("adapt_conv.weight", layer.weight.shape))
    out = layer(torch.from_numpy(golden["x"]), torch.from_numpy(golden["sampling_offset"]))
    np.testing.assert_allclose(out.numpy(), golden["deform_out"], rtol=0, atol=1e-5)


def test_parameters_are_laid_out_as_torchvision_s():
    assert list(OrtDeformConv2d(15, 15, 3, padding=1, bias=False).state_dict()) == ["weight"]
    layer = OrtDeformConv2d(8, 4, 3, groups=2)
    assert layer.weight.shape == (4, 4, 3, 3) and layer.bias.shape == (4,)
    with pytest.raises(NotImplementedError, match="DCNv1 only"):
        layer(torch.zeros(1, 8, 5, 5), torch.zeros(1, 18, 3, 3), mask=torch.ones(1, 9, 3, 3))


def test_stand_in_is_named_and_only_where_torchvision_is_unusable():
    stand_ins = torchvision_stand_ins()
    if not stand_ins:
        pytest.skip("torchvision imports on this host: upstream uses it directly")
    package, description = stand_ins["torchvision"]
    assert package.ops.DeformConv2d is OrtDeformConv2d
    assert "served by ONNX Runtime" in description and "DeformConv (opset 19)" in description


# -- the builders on a checkout laid out as upstream's -------------------------------------------

def yacs_layout(config: str, models: dict[str, str]) -> dict[str, str]:
    """Files of a checkout laid out as DEKR's and TransPose's upstreams are: ``lib/config`` yacs
    defaults (``config``: the lines after ``_C = CN()``), ``lib/models`` a package importing each
    of ``models`` (module name -> source)."""
    return {
        "lib/config/__init__.py": "from .default import _C as cfg\n",
        "lib/config/default.py": "from yacs.config import CfgNode as CN\n\n_C = CN()\n" + textwrap.dedent(config),
        "lib/models/__init__.py": "".join(f"import models.{name}\n" for name in models),
        **{f"lib/models/{name}.py": source for name, source in models.items()},
    }


def generated_checkout(tmp_path: Path, commit_files, model: str, files: dict[str, str]):
    commit = commit_files(tmp_path / "upstream" / model, files)
    return UpstreamSource(model, "", commit, tmp_path / "no-patches", ("yacs",)).checkout(tmp_path / "cache", tmp_path / "upstream")


FAKE_UPSTREAM = {
    **yacs_layout("""
        _C.MODEL = CN()
        _C.MODEL.CHANNELS = 4
        _C.RESCORE = CN()
        _C.RESCORE.HIDDEN_LAYER = 8
    """, {"hrnet_dekr": """
        import torch
        import torchvision.ops as ops


        class TinyAdaptive(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()
                channels = cfg.MODEL.CHANNELS
                self.offset_conv = torch.nn.Conv2d(channels, 18, 3, 1, 1)
                self.adapt_conv = ops.DeformConv2d(channels, channels, kernel_size=3, padding=1, bias=False)

            def forward(self, x):
                return self.adapt_conv(x, self.offset_conv(x))


        def get_pose_net(cfg, is_train):
            return TinyAdaptive(cfg)
    """, "predictOKS": """
        import torch


        class ScoreMLP(torch.nn.Module):
            def __init__(self, cfg, features):
                super().__init__()
                width = cfg.RESCORE.HIDDEN_LAYER
                self.l1 = torch.nn.Linear(features, width)
                self.l2 = torch.nn.Linear(width, width)
                self.l3 = torch.nn.Linear(width, 1)
                self.relu = torch.nn.ReLU()

            def forward(self, x):
                return self.l3(self.relu(self.l2(self.relu(self.l1(x)))))


        def get_pose_net(cfg, features, is_train):
            return ScoreMLP(cfg, features)
    """}),
    UPSTREAM_EXPERIMENT: "MODEL:\n  CHANNELS: 6\n",
    UPSTREAM_RESCORE_EXPERIMENT: "RESCORE:\n  HIDDEN_LAYER: 256\n",
}


@pytest.fixture
def fake_checkout(tmp_path, commit_files):
    return generated_checkout(tmp_path, commit_files, "dekr", FAKE_UPSTREAM)


def test_upstream_network_uses_the_stand_in_and_leaves_no_torchvision_behind(fake_checkout):
    if not torchvision_stand_ins():
        pytest.skip("torchvision imports on this host")
    net = SLICE.build_upstream_network("hrnet_dekr", fake_checkout)
    assert isinstance(net.adapt_conv, OrtDeformConv2d)
    assert net(torch.randn(1, 6, 5, 5)).shape == (1, 6, 5, 5)
    assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules
    assert "served by ONNX Runtime" in fake_checkout.stand_ins["torchvision.ops"]


def test_rescore_port_matches_upstream_builder(tmp_path, fake_checkout):
    """The rescoring net's port-vs-upstream comparison, as the gate runs it, on the upstream builder
    (``models.predictOKS.get_pose_net(cfg, 74)`` with the rescoring experiment)."""
    handle = Workspace(Roots(None, None, None, tmp_path / "cache")).model("dekr")
    handle._upstream["dekr"] = fake_checkout  # what upstream_checkout() would build from a staged clone
    seeded = WeightsChoice(None, "public")
    upstream, _ = handle.network("rescore", None, seeded, source="upstream")
    port, _ = handle.network("rescore", None, seeded)
    net = handle.spec.networks["rescore"]
    feeds = {"feature": np.random.default_rng(0).standard_normal((16, 74)).astype(np.float32)}
    expected = TorchSession(upstream, net.input_names, net.output_names).run(feeds)
    actual = TorchSession(port, net.input_names, net.output_names).run(feeds)
    stats = assert_outputs_match(actual, expected, net.outputs, "rescore port vs upstream")
    assert stats[0].max_abs == 0.0  # same maths, same weights, same kernels


# -- DEKR and TransPose upstreams in one process -----------------------------------------------

FAKE_TRANSPOSE = {
    **yacs_layout("""
        _C.MODEL = CN()
        _C.MODEL.DIM_MODEL = 4
    """, {"transpose_r": """
        import torch


        class Marker(torch.nn.Module):
            def __init__(self, width):
                super().__init__()
                self.width = width

            def forward(self, x):
                return x


        def get_pose_net(cfg, is_train):
            return Marker(cfg.MODEL.DIM_MODEL)
    """}),
    "experiments/coco/transpose_r/TP_R_256x192_d256_h1024_enc3_mh8.yaml": "MODEL:\n  DIM_MODEL: 256\n",
}


@pytest.mark.transpose
@pytest.mark.parametrize("order", [("dekr", "transpose"), ("transpose", "dekr")])
def test_dekr_and_transpose_upstreams_build_in_either_order(tmp_path, commit_files, order):
    """Both repositories ship top-level ``config`` and ``models``: each slice's real builder must get
    its own repository's, whichever is imported first."""
    from tooling.models.transpose.slice import SLICE as TRANSPOSE

    checkouts = {"dekr": generated_checkout(tmp_path, commit_files, "dekr", FAKE_UPSTREAM),
                 "transpose": generated_checkout(tmp_path, commit_files, "transpose", FAKE_TRANSPOSE)}
    built = {}
    for model in order:
        if model == "dekr":
            built[model] = SLICE.build_upstream_network("rescore", checkouts[model])
        else:
            built[model] = TRANSPOSE.build_upstream_network("transpose_r", checkouts[model])
    assert type(built["dekr"]).__name__ == "ScoreMLP" and built["dekr"].l1.weight.shape == (256, 74)
    assert type(built["transpose"]).__name__ == "Marker" and built["transpose"].width == 256
    assert "config" not in sys.modules and "models" not in sys.modules
