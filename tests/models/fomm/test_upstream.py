"""FOMM's upstream builders and the guide's patch hook, on generated checkouts of both repositories.

The real first-order-model and pose repositories cannot be downloaded on this host; these
checkouts are laid out as theirs are (``config/taichi-256.yaml`` with ``model_params``,
``modules/`` whose generator and dense-motion network warp with ``F.grid_sample`` and no
``align_corners``, the pose repository's ``network/rtpose_vgg.get_model`` returning every stage),
written here in our own words. What they prove: each network is built from its own checkout with
the arguments the config gives, answers under the port's names, and the hook in ``patches/fomm/``
changes the generator's warps and nothing else.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tooling.backends.cpu import TorchSession
from tooling.locations import Roots
from tooling.sources import UpstreamNotStaged
from tooling.weights import WeightsChoice
from tooling.workspace import Workspace

pytestmark = [pytest.mark.fomm]

FIRST_ORDER_MODEL = {
    "config/taichi-256.yaml": """
        dataset_params: {root_dir: data/elsewhere}
        model_params:
          common_params: {num_kp: 3, num_channels: 3, estimate_jacobian: true}
          kp_detector_params: {temperature: 0.1, block_expansion: 4}
          generator_params: {block_expansion: 5, dense_motion_params: {scale_factor: 0.5}}
    """,
    "modules/__init__.py": "",
    "modules/keypoint_detector.py": """
        import torch


        class KPDetector(torch.nn.Module):
            def __init__(self, num_kp, num_channels, estimate_jacobian, temperature, block_expansion):
                super().__init__()
                self.arguments = dict(num_kp=num_kp, num_channels=num_channels, estimate_jacobian=estimate_jacobian,
                                      temperature=temperature, block_expansion=block_expansion)
                self.kp = torch.nn.Conv2d(num_channels, num_kp, 1)

            def forward(self, x):
                heat = self.kp(x).mean(dim=(2, 3))
                return {"value": heat[..., None].repeat(1, 1, 2), "jacobian": heat[..., None, None].repeat(1, 1, 2, 2)}
    """,
    "modules/dense_motion.py": """
        import torch.nn.functional as F


        def sparse_warp(image, grid):
            return F.grid_sample(image, grid)
    """,
    "modules/generator.py": """
        import torch
        import torch.nn.functional as F

        from modules.dense_motion import sparse_warp


        class OcclusionAwareGenerator(torch.nn.Module):
            def __init__(self, num_kp, num_channels, estimate_jacobian, block_expansion, dense_motion_params):
                super().__init__()
                self.arguments = dict(num_kp=num_kp, num_channels=num_channels, estimate_jacobian=estimate_jacobian,
                                      block_expansion=block_expansion, dense_motion_params=dense_motion_params)
                self.final = torch.nn.Conv2d(num_channels, num_channels, 1)

            def forward(self, source_image, kp_driving, kp_source):
                shift = (kp_driving["value"] - kp_source["value"]).mean(dim=1)
                scale = (kp_driving["jacobian"] * kp_source["jacobian"]).mean(dim=(1, 2, 3))
                height, width = source_image.shape[2:]
                ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
                grid = torch.stack([xs, ys], dim=-1)[None] * scale[:, None, None, None] + shift[:, None, None, :]
                return {"sparse_deformed": sparse_warp(source_image, grid),
                        "deformed": F.grid_sample(source_image, grid),
                        "prediction": torch.sigmoid(self.final(source_image))}
    """,
}

POSE_REPOSITORY = {
    "network/__init__.py": "",
    "network/rtpose_vgg.py": """
        import torch


        def get_model(trunk="vgg19"):
            class CPM(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.trunk = trunk
                    self.model0 = torch.nn.Conv2d(3, 4, 3, padding=1)
                    self.model1_1 = torch.nn.Conv2d(4, 38, 1)
                    self.model1_2 = torch.nn.Conv2d(4, 19, 1)

                def forward(self, x):
                    features = self.model0(x)
                    paf, heat = self.model1_1(features), self.model1_2(features)
                    return (paf * 2, heat * 2), [paf, heat, paf * 2, heat * 2]

            return CPM()
    """,
}


@pytest.fixture
def handle(tmp_path, commit_files):
    """The FOMM handle with its yaml's two checkouts pinned to generated repositories, staged as the
    README says: ``<upstream-root>/fomm`` and ``<upstream-root>/fomm-pose-estimation``."""
    root = tmp_path / "upstream-root"
    pins = {"fomm": commit_files(root / "fomm", FIRST_ORDER_MODEL),
            "fomm-pose-estimation": commit_files(root / "fomm-pose-estimation", POSE_REPOSITORY)}
    handle = Workspace(Roots(None, None, root, tmp_path / "cache")).model("fomm")
    upstream = {name: {**entry, "commit": pins[name]} for name, entry in handle.spec.upstream.items()}
    assert set(upstream) == set(pins), "the yaml names a checkout this test does not generate"
    handle.spec = dataclasses.replace(handle.spec, upstream=upstream)
    yield handle
    assert not [m for m in sys.modules if m.split(".")[0] in ("modules", "network")], "upstream modules leaked"


SEEDED = WeightsChoice(None, "public")


def run(handle, network: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    module, _ = handle.network(network, None, SEEDED, source="upstream")
    return TorchSession(module, handle.spec.networks[network].input_names, outputs).run(feeds)


def test_detector_and_generator_take_the_configs_common_and_own_params(handle):
    detector, _ = handle.network("kp_detector", None, SEEDED, source="upstream")
    generator, _ = handle.network("generator", None, SEEDED, source="upstream")
    common = {"num_kp": 3, "num_channels": 3, "estimate_jacobian": True}
    assert detector.arguments == {**common, "temperature": 0.1, "block_expansion": 4}
    assert generator.arguments == {**common, "block_expansion": 5, "dense_motion_params": {"scale_factor": 0.5}}
    assert handle.upstream_checkout("kp_detector") is handle.upstream_checkout("generator")


def test_generator_answers_flat_keypoints_and_warps_as_the_guide_patches_it(handle):
    """The hook: the generator's own warp samples with align_corners=True, the dense-motion
    network's with torch's default (False), as the guide's patch leaves them."""
    rng = np.random.default_rng(0)
    feeds = {"source_imgs": rng.uniform(0, 1, (1, 3, 9, 11)).astype(np.float32),
             "kp_driving_value": rng.uniform(-0.2, 0.2, (1, 3, 2)).astype(np.float32),
             "kp_driving_jac": rng.uniform(0.9, 1.1, (1, 3, 2, 2)).astype(np.float32),
             "kp_source_value": rng.uniform(-0.2, 0.2, (1, 3, 2)).astype(np.float32),
             "kp_source_jac": rng.uniform(0.9, 1.1, (1, 3, 2, 2)).astype(np.float32)}
    out = run(handle, "generator", feeds, ["sparse_deformed", "deformed"])
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    shift = (t["kp_driving_value"] - t["kp_source_value"]).mean(dim=1)
    scale = (t["kp_driving_jac"] * t["kp_source_jac"]).mean(dim=(1, 2, 3))
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 9), torch.linspace(-1, 1, 11), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1)[None] * scale[:, None, None, None] + shift[:, None, None, :]
    guide = F.grid_sample(t["source_imgs"], grid, align_corners=True).numpy()
    modern = F.grid_sample(t["source_imgs"], grid, align_corners=False).numpy()
    np.testing.assert_allclose(out["deformed"], guide, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["sparse_deformed"], modern, rtol=0, atol=1e-6)
    assert np.abs(guide - modern).max() > 1e-2, "the two conventions must differ on this grid"


def test_pose_net_comes_from_its_own_checkout_and_answers_stage_six(handle):
    pose, _ = handle.network("pose_estimator", None, SEEDED, source="upstream")
    assert pose.trunk == "vgg19"
    assert handle.upstream_checkout("pose_estimator").root.name.startswith("fomm-pose-estimation-")
    assert handle.upstream_checkout("pose_estimator").root != handle.upstream_checkout("kp_detector").root
    image = np.random.default_rng(1).uniform(-0.5, 0.5, (1, 3, 8, 8)).astype(np.float32)
    out = run(handle, "pose_estimator", {"input": image}, ["paf", "heatmap"])
    with torch.no_grad():
        features = pose.model0(torch.from_numpy(image))
        np.testing.assert_allclose(out["paf"], 2 * pose.model1_1(features).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["heatmap"], 2 * pose.model1_2(features).numpy(), rtol=1e-6, atol=1e-6)


def test_the_pose_checkout_not_staged_skips_only_the_pose_row_with_its_path(handle):
    root = handle.ws.roots.upstream_root
    (root / "fomm-pose-estimation").rename(root / "elsewhere")
    handle.network("kp_detector", None, SEEDED, source="upstream")  # its own checkout is staged
    with pytest.raises(UpstreamNotStaged) as raised:
        handle.network("pose_estimator", None, SEEDED, source="upstream")
    message = str(raised.value)
    assert "upstream fomm-pose-estimation (for pose_estimator) not staged" in message
    assert "pytorch_Realtime_Multi-Person_Pose_Estimation.git" in message
    assert f"to {root / 'fomm-pose-estimation'} or a bare mirror to {root / 'fomm-pose-estimation.git'}" in message
