"""HRNet-W32 + DEKR heads (``hrnet_dekr``), written from spec §a.

Attribute names and registration order reproduce ``state_dict_hrnet_dekr.tsv`` exactly, so the
upstream checkpoint loads with ``strict=True``. Input H and W must be multiples of 32; outputs are
at stride 4: ``heatmap`` (N, 18, H/4, W/4) (17 COCO joints + person centre) and ``offset``
(N, 34, H/4, W/4) (x, y displacement per joint; keypoint = pixel - offset).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tooling.models.dekr.deform_conv import DeformConv3x3, DeformVariant

NUM_JOINTS = 17
HEATMAP_CHANNELS = NUM_JOINTS + 1  # the last channel is the person centre
OFFSET_CHANNELS_PER_JOINT = 15
HEAD_HEATMAP_CHANNELS = 32
STAGE_CHANNELS: tuple[tuple[int, ...], ...] = ((32, 64), (32, 64, 128), (32, 64, 128, 256))
STAGE_MODULES: tuple[int, ...] = (1, 4, 3)
BLOCKS_PER_BRANCH = 4
OUTPUT_STRIDE = 4
INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("heatmap", "offset")

# The canonical regular 3x3 grid: row 0 = kernel-row displacement, row 1 = kernel-column one.
CANONICAL_REGULAR_MATRIX = (
    (-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0),
    (-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0),
)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = conv_bn(in_channels, out_channels, 1, relu=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _fuse_layer(channels: Sequence[int], target: int, source: int) -> nn.Module | None:
    """Resamples branch ``source`` to branch ``target``'s resolution and channel count."""
    if source == target:
        return None
    if source > target:
        return nn.Sequential(
            nn.Conv2d(channels[source], channels[target], 1, bias=False),
            nn.BatchNorm2d(channels[target]),
            nn.Upsample(scale_factor=2 ** (source - target), mode="nearest"),
        )
    steps = target - source
    downsamples = [conv_bn(channels[source], channels[source], 3, stride=2) for _ in range(steps - 1)]
    downsamples.append(conv_bn(channels[source], channels[target], 3, stride=2, relu=False))
    return nn.Sequential(*downsamples)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks followed by all-to-all fusion; returns every branch."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c) for _ in range(BLOCKS_PER_BRANCH))) for c in channels
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse_layer(channels, target, source) for source in range(len(channels)))
            for target in range(len(channels))
        )
        self.relu = nn.ReLU()

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        features = [branch(x) for branch, x in zip(self.branches, inputs)]
        outputs = []
        for target, fuse_row in enumerate(self.fuse_layers):
            # Summation order as upstream: branch 0 first, then 1..B-1.
            total = features[0] if fuse_row[0] is None else fuse_row[0](features[0])
            for source in range(1, len(features)):
                fuse = fuse_row[source]
                total = total + (features[source] if fuse is None else fuse(features[source]))
            outputs.append(self.relu(total))
        return outputs


def _transition(previous: Sequence[int], current: Sequence[int]) -> nn.ModuleList:
    """Adapts existing branches whose width changes and spawns new, lower-resolution branches."""
    layers: list[nn.Module | None] = []
    for index, channels in enumerate(current):
        if index < len(previous):
            layers.append(conv_bn(previous[index], channels, 3) if previous[index] != channels else None)
        else:
            steps = index + 1 - len(previous)
            layers.append(nn.Sequential(*(
                conv_bn(previous[-1], channels if step == steps - 1 else previous[-1], 3, stride=2)
                for step in range(steps)
            )))
    return nn.ModuleList(layers)


class AdaptBlock(nn.Module):
    """Residual block whose deformable 3x3 conv samples a per-pixel affine warp of the regular grid."""

    def __init__(self, channels: int = OFFSET_CHANNELS_PER_JOINT, deform_variant: DeformVariant = "grid_sample") -> None:
        super().__init__()
        # A buffer, not a constant: it is in the checkpoint (and seeded weights overwrite it).
        self.register_buffer("regular_matrix", torch.tensor(CANONICAL_REGULAR_MATRIX))
        self.transform_matrix_conv = nn.Conv2d(channels, 4, 3, 1, 1, bias=True)
        self.translation_conv = nn.Conv2d(channels, 2, 3, 1, 1, bias=True)
        self.adapt_conv = DeformConv3x3(channels, channels, deform_variant)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def sampling_offset(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 18, H, W) deformable offsets, torchvision layout: channel 2k = dy, 2k+1 = dx of tap k."""
        batch, _, height, width = x.shape
        # Each pixel's four channels form the row-major 2x2 matrix A. Explicit reshapes rather than
        # unflatten keep the graph exportable at the seed's opset 11.
        affine = self.transform_matrix_conv(x).permute(0, 2, 3, 1).reshape(batch, height, width, 2, 2)
        displacement = affine @ self.regular_matrix - self.regular_matrix  # (N, H, W, 2, 9)
        offset = displacement.transpose(-1, -2).reshape(batch, height, width, 18).permute(0, 3, 1, 2)
        return offset + self.translation_conv(x).repeat(1, 9, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.adapt_conv(x, self.sampling_offset(x))) + x)


class HRNetDEKR(nn.Module):
    def __init__(self, deform_variant: DeformVariant = "grid_sample") -> None:
        super().__init__()
        self.deform_variant = deform_variant  # part of an exported artifact's identity (cache keys)
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(*(Bottleneck(64 if i == 0 else 256, 64) for i in range(4)))

        stem_channels = (64 * Bottleneck.expansion,)
        self.transition1 = _transition(stem_channels, STAGE_CHANNELS[0])
        self.stage2 = self._stage(0)
        self.transition2 = _transition(STAGE_CHANNELS[0], STAGE_CHANNELS[1])
        self.stage3 = self._stage(1)
        self.transition3 = _transition(STAGE_CHANNELS[1], STAGE_CHANNELS[2])
        self.stage4 = self._stage(2)

        backbone_channels = sum(STAGE_CHANNELS[-1])
        offset_channels = NUM_JOINTS * OFFSET_CHANNELS_PER_JOINT
        self.transition_heatmap = conv_bn(backbone_channels, HEAD_HEATMAP_CHANNELS, 1)
        self.transition_offset = conv_bn(backbone_channels, offset_channels, 1)
        self.head_heatmap = nn.ModuleList([
            nn.Sequential(BasicBlock(HEAD_HEATMAP_CHANNELS)),
            nn.Conv2d(HEAD_HEATMAP_CHANNELS, HEATMAP_CHANNELS, 1, bias=True),
        ])
        self.offset_feature_layers = nn.ModuleList(
            nn.Sequential(*(AdaptBlock(OFFSET_CHANNELS_PER_JOINT, deform_variant) for _ in range(2)))
            for _ in range(NUM_JOINTS)
        )
        self.offset_final_layer = nn.ModuleList(
            nn.Conv2d(OFFSET_CHANNELS_PER_JOINT, 2, 1, bias=True) for _ in range(NUM_JOINTS)
        )

    @staticmethod
    def _stage(index: int) -> nn.Sequential:
        return nn.Sequential(*(HighResolutionModule(STAGE_CHANNELS[index]) for _ in range(STAGE_MODULES[index])))

    def backbone(self, image: torch.Tensor) -> torch.Tensor:
        """Stride-4 feature map with all four branches concatenated (480 channels)."""
        x = self.relu(self.bn1(self.conv1(image)))
        x = self.relu(self.bn2(self.conv2(x)))
        branches = [self.layer1(x)]
        for transition, stage in (
            (self.transition1, self.stage2), (self.transition2, self.stage3), (self.transition3, self.stage4)
        ):
            # New branches grow from the lowest-resolution output of the previous stage.
            inputs = [
                branches[index] if layer is None else layer(branches[-1])
                for index, layer in enumerate(transition)
            ]
            branches = stage(inputs)
        size = branches[0].shape[-2:]
        upsampled = [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in branches[1:]]
        return torch.cat([branches[0], *upsampled], dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(image)
        heatmap = self.head_heatmap[1](self.head_heatmap[0](self.transition_heatmap(features)))
        offset_features = self.transition_offset(features).split(OFFSET_CHANNELS_PER_JOINT, dim=1)
        offsets = [
            final(adapt(joint_features))
            for joint_features, adapt, final in zip(offset_features, self.offset_feature_layers, self.offset_final_layer)
        ]
        return heatmap, torch.cat(offsets, dim=1)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the ``module.`` prefix DataParallel checkpoints carry (as the seed's export script does)."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def build_hrnet_dekr(deform_variant: DeformVariant = "grid_sample") -> HRNetDEKR:
    """Randomly initialised network in eval mode; load a checkpoint or apply seeded weights next."""
    return HRNetDEKR(deform_variant).eval()

