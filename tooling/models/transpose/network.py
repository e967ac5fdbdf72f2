"""TransPose-R-A3 (COCO keypoints, 256x192): clean-room port written from spec 003, section a.

ResNet-50 stem plus layer1/layer2 ("ResNet-S"), a 1x1 reduction to 256 channels, three DETR-style
post-norm transformer encoder layers over the 32x24 token grid, and a deconvolution head that
emits 17 heatmaps at 64x48. Attribute names are the upstream ones so that the released
checkpoint loads with ``strict=True``; stateless modules (ReLU, pooling, dropout) own no keys.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

INPUT_HEIGHT, INPUT_WIDTH = 256, 192
NUM_JOINTS = 17
MODEL_DIM = 256
FEEDFORWARD_DIM = 1024
NUM_HEADS = 8
NUM_ENCODER_LAYERS = 3
BACKBONE_STRIDE = 8
BOTTLENECK_EXPANSION = 4
BATCHNORM_EPS = 1e-5
LAYERNORM_EPS = 1e-5
# Training-time value; eval() turns every dropout into the identity.
DROPOUT = 0.1
POS_TEMPERATURE = 10000.0
POS_NORMALISE_EPS = 1e-6


class Bottleneck(nn.Module):
    """ResNet-v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width_out = planes * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BATCHNORM_EPS)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BATCHNORM_EPS)
        self.conv3 = nn.Conv2d(planes, width_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width_out, eps=BATCHNORM_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != width_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, width_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width_out, eps=BATCHNORM_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_resnet_layer(inplanes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [Bottleneck(inplanes, planes, stride)]
    blocks += [Bottleneck(planes * BOTTLENECK_EXPANSION, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; the position embedding is added to queries and keys only."""

    def __init__(self, d_model: int, num_heads: int, feedforward_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, feedforward_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=LAYERNORM_EPS)
        self.norm2 = nn.LayerNorm(d_model, eps=LAYERNORM_EPS)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.ReLU()

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        query_key = src + pos
        # need_weights stays at its default: the fused SDPA path it would otherwise take needs
        # opset 14, and the Ascend recipe exports at opset 11. The weights themselves are unused.
        attended = self.self_attn(query_key, query_key, value=src)[0]
        x = self.norm1(src + self.dropout1(attended))
        feedforward = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(feedforward))


class GlobalEncoder(nn.Module):
    """Stack of identical layers, the position embedding fed to every one, no final norm."""

    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


def sine_position_embedding(
    grid_height: int = INPUT_HEIGHT // BACKBONE_STRIDE,
    grid_width: int = INPUT_WIDTH // BACKBONE_STRIDE,
    d_model: int = MODEL_DIM,
) -> torch.Tensor:
    """Fixed 2-D sine table [H*W, 1, d_model], y half first, sin/cos interleaved per channel pair.

    Positions are (index+1) normalised by the last index plus a small eps, times 2*pi.
    """
    half = d_model // 2
    scale = 2.0 * math.pi
    rows = torch.arange(1, grid_height + 1, dtype=torch.float32)
    cols = torch.arange(1, grid_width + 1, dtype=torch.float32)
    grid = (grid_height, grid_width)
    y_embed = (rows / (grid_height + POS_NORMALISE_EPS) * scale)[:, None].expand(grid)
    x_embed = (cols / (grid_width + POS_NORMALISE_EPS) * scale)[None, :].expand(grid)
    channel = torch.arange(half, dtype=torch.float32)
    dim_t = POS_TEMPERATURE ** (2 * torch.div(channel, 2, rounding_mode="floor") / half)

    def interleave(embed: torch.Tensor) -> torch.Tensor:
        phase = embed[..., None] / dim_t
        return torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=-1).flatten(-2)

    table = torch.cat((interleave(y_embed), interleave(x_embed)), dim=-1)
    return table.reshape(grid_height * grid_width, 1, d_model)


class TransPoseR(nn.Module):
    """TransPose-R-A3: input [N,3,256,192] normalised RGB, output [N,17,64,48] heatmaps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BATCHNORM_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_resnet_layer(64, 64, num_blocks=3, stride=1)
        self.layer2 = make_resnet_layer(64 * BOTTLENECK_EXPANSION, 128, num_blocks=4, stride=2)
        self.reduce = nn.Conv2d(128 * BOTTLENECK_EXPANSION, MODEL_DIM, kernel_size=1, bias=False)
        # Stored, frozen, never recomputed: the checkpoint carries it as state_dict key #1.
        self.pos_embedding = nn.Parameter(sine_position_embedding(), requires_grad=False)
        self.global_encoder = GlobalEncoder(
            EncoderLayer(MODEL_DIM, NUM_HEADS, FEEDFORWARD_DIM, DROPOUT), NUM_ENCODER_LAYERS
        )
        self.deconv_layers = nn.Sequential(
            nn.ConvTranspose2d(MODEL_DIM, MODEL_DIM, kernel_size=4, stride=2, padding=1,
                               output_padding=0, bias=False),
            nn.BatchNorm2d(MODEL_DIM, eps=BATCHNORM_EPS),
            nn.ReLU(inplace=True),
        )
        self.final_layer = nn.Conv2d(MODEL_DIM, NUM_JOINTS, kernel_size=1)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, layer1, layer2 and the 1x1 reduction: [N,3,256,192] -> [N,256,32,24]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.reduce(self.layer2(self.layer1(x)))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder over the row-major token sequence, sequence-first: returns [H*W, N, C]."""
        tokens = features.flatten(2).permute(2, 0, 1)
        return self.global_encoder(tokens, self.pos_embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        batch, channels, height, width = features.shape
        encoded = self.encode(features)
        grid = encoded.permute(1, 2, 0).reshape(batch, channels, height, width)
        return self.final_layer(self.deconv_layers(grid))


def build_transpose_r() -> TransPoseR:
    """A TransPose-R-A3 in eval mode; load a checkpoint or apply seeded weights afterwards."""
    return TransPoseR().eval()


ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "output"
