"""The OpenPose-style body-pose network (rtpose CPM, VGG19 trunk) that scores FOMM's videos.

Not deployed: pose-evaluation runs it on the host to find keypoints in real and generated frames
(spec e3, e5). Module names match ``pose_model.pth`` (``model0``, ``model{stage}_{branch}``).
"""
from __future__ import annotations

import torch
from torch import nn

PAF_CHANNELS = 38
HEATMAP_CHANNELS = 19
STAGES = 6
STRIDE = 8

# VGG19 trunk: conv widths in order, "M" for a 2x2 max-pool.
TRUNK = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 256, 128]


def _sequential(layers: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(*layers)


def _trunk() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for width in TRUNK:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return _sequential(layers)


def _stage_one(out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(128, 512, 1), nn.ReLU(inplace=True), nn.Conv2d(512, out, 1)]
    return _sequential(layers)


def _later_stage(out: int) -> nn.Sequential:
    features = 128 + PAF_CHANNELS + HEATMAP_CHANNELS
    layers: list[nn.Module] = [nn.Conv2d(features, 128, 7, padding=3), nn.ReLU(inplace=True)]
    for _ in range(4):
        layers += [nn.Conv2d(128, 128, 7, padding=3), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(128, 128, 1), nn.ReLU(inplace=True), nn.Conv2d(128, out, 1)]
    return _sequential(layers)


class PoseEstimator(nn.Module):
    """(B,3,H,W) normalised BGR (pixel/256 - 0.5) -> stage-6 ``paf`` (38 ch) and ``heatmap`` (19 ch) at H/8."""

    def __init__(self):
        super().__init__()
        self.model0 = _trunk()
        # Registration order as upstream (every PAF branch, then every heatmap branch), so the
        # state_dict lists its keys in the checkpoint's order.
        for branch, channels in ((1, PAF_CHANNELS), (2, HEATMAP_CHANNELS)):
            for stage in range(1, STAGES + 1):
                make = _stage_one if stage == 1 else _later_stage
                setattr(self, f"model{stage}_{branch}", make(channels))

    def forward(self, image):
        trunk = self.model0(image)
        paf, heatmap = self.model1_1(trunk), self.model1_2(trunk)
        for stage in range(2, STAGES + 1):
            joined = torch.cat([paf, heatmap, trunk], dim=1)
            paf = getattr(self, f"model{stage}_1")(joined)
            heatmap = getattr(self, f"model{stage}_2")(joined)
        return {"paf": paf, "heatmap": heatmap}


def build_pose_estimator() -> PoseEstimator:
    return PoseEstimator().eval()
