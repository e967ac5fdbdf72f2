"""Both VideoPose3D checkpoint layouts load strictly into the port and give the same network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tooling.model_spec import FIXTURES_DIR
from tooling.models.videopose3d import SLICE
from tooling.models.videopose3d.network import build_vp3d
from tooling.models.videopose3d.slice import oracle_state_dict
from tooling.seeded import apply_seeded_weights
from tooling.weights import CheckpointError, WeightsChoice, apply_weights

pytestmark = [pytest.mark.videopose3d]


def _tsv(name):
    rows = (FIXTURES_DIR / "videopose3d" / name).read_text().splitlines()[1:]
    return [(key, tuple(int(d) for d in shape.split("x")) if shape != "()" else ()) for key, shape, _ in (r.split("\t") for r in rows)]


def test_port_state_dict_matches_the_upstream_key_list():
    state = build_vp3d().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == _tsv("state_dict_vp3d.tsv")


@pytest.mark.parametrize("layout", ["upstream_conv1d_dataparallel", "ascend_conv2d"])
def test_checkpoint_layouts_load_to_the_same_network(tmp_path, layout):
    reference = apply_seeded_weights(build_vp3d(), "ckpt")
    state = reference.state_dict()
    conv1d_shapes = dict(_tsv("state_dict_vp3d_upstream_conv1d.tsv"))
    if layout == "upstream_conv1d_dataparallel":
        state = {f"module.{k}": v.reshape(conv1d_shapes[k]) for k, v in state.items()}
    path = tmp_path / "model_best.bin"
    torch.save({"epoch": 80, "model_pos": state}, path)
    loaded = build_vp3d()
    apply_weights(loaded, WeightsChoice(path), SLICE, "vp3d", ["model_pos"])
    x = torch.randn(2, 250, 17, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_checkpoint_of_another_architecture_is_refused_with_keys(tmp_path):
    state = build_vp3d().state_dict()
    state["layers_conv.8.weight"] = torch.zeros(1024, 1024, 3, 1)
    state["shrink.weight"] = torch.zeros(48, 1024, 1, 1)
    path = tmp_path / "model_best.bin"
    torch.save({"model_pos": state}, path)
    with pytest.raises(CheckpointError, match=r"model_best.bin.*unexpected keys: layers_conv.8.weight.*shrink.weight: checkpoint \(48"):
        apply_weights(build_vp3d(), WeightsChoice(path), SLICE, "vp3d", ["model_pos"])


def test_oracle_weights_copy_each_frame_to_the_output():
    """The known-answer checkpoint really makes the network output (x, y, 0) of the centre frame."""
    net = build_vp3d()
    net.load_state_dict(SLICE.adapt_state_dict("vp3d", oracle_state_dict(upstream_layout=True)))
    x = torch.randn(1, 300, 17, 2)
    with torch.no_grad():
        y = net.eval()(x)
    np.testing.assert_allclose(y[..., :2].numpy(), x[:, 121:-121].numpy(), atol=1e-5)
    assert torch.count_nonzero(y[..., 2]) == 0
