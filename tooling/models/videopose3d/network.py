"""Temporal convolution network that lifts 2-D keypoint sequences to 3-D (clean-room port).

The layout is the one the Ascend export uses: 1-D temporal convolutions written as Conv2d with a
(k, 1) kernel over a trailing singleton axis, which is numerically identical to Conv1d and what
the OM conversion was tuned for. Attribute names and registration order reproduce the upstream
state_dict so its checkpoints load strictly.
"""
from __future__ import annotations

import torch
from torch import nn

RECEPTIVE_FIELD = 243
ONE_SIDED_PAD = (RECEPTIVE_FIELD - 1) // 2  # 121 frames of context each side


class TemporalLiftingNetwork(nn.Module):
    def __init__(
        self,
        num_joints_in: int = 17,
        in_features: int = 2,
        num_joints_out: int = 17,
        filter_widths: tuple[int, ...] = (3, 3, 3, 3, 3),
        dropout: float = 0.25,
        channels: int = 1024,
    ):
        super().__init__()
        for width in filter_widths:
            if width % 2 == 0:
                raise ValueError(f"filter widths must be odd, got {filter_widths}")
        self.num_joints_in = num_joints_in
        self.in_features = in_features
        self.num_joints_out = num_joints_out
        self.filter_widths = tuple(filter_widths)
        # Registration order matters: it fixes the state_dict order upstream checkpoints use.
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU(inplace=True)
        self.expand_bn = nn.BatchNorm2d(channels, momentum=0.1)
        self.shrink = nn.Conv2d(channels, num_joints_out * 3, kernel_size=1)
        self.expand_conv = nn.Conv2d(num_joints_in * in_features, channels, (filter_widths[0], 1), bias=False)

        convs, norms = [], []
        self.pad = [filter_widths[0] // 2]
        dilation = filter_widths[0]
        for width in filter_widths[1:]:
            self.pad.append((width - 1) * dilation // 2)
            convs.append(nn.Conv2d(channels, channels, (width, 1), dilation=dilation, bias=False))
            norms.append(nn.BatchNorm2d(channels, momentum=0.1))
            convs.append(nn.Conv2d(channels, channels, 1, dilation=1, bias=False))
            norms.append(nn.BatchNorm2d(channels, momentum=0.1))
            dilation *= width
        self.layers_conv = nn.ModuleList(convs)
        self.layers_bn = nn.ModuleList(norms)

    def forward(self, poses_2d: torch.Tensor) -> torch.Tensor:
        n, t = poses_2d.shape[0], poses_2d.shape[1]
        # (N, T, J, F) -> (N, J*F, T, 1), features joint-major as the checkpoint's first conv expects
        x = poses_2d.reshape(n, t, -1).permute(0, 2, 1).unsqueeze(-1)
        x = self.drop(self.relu(self.expand_bn(self.expand_conv(x))))
        for block, trim in enumerate(self.pad[1:]):
            residual = x[:, :, trim : x.shape[2] - trim]
            x = self.drop(self.relu(self.layers_bn[2 * block](self.layers_conv[2 * block](x))))
            x = residual + self.drop(self.relu(self.layers_bn[2 * block + 1](self.layers_conv[2 * block + 1](x))))
        x = self.shrink(x).squeeze(-1).permute(0, 2, 1)
        return x.reshape(n, -1, self.num_joints_out, 3)


def build_vp3d() -> TemporalLiftingNetwork:
    """The 243-frame configuration of the published CPN model and of the Ascend export."""
    return TemporalLiftingNetwork(17, 2, 17, (3, 3, 3, 3, 3), dropout=0.25, channels=1024).eval()
