"""FOMM (taichi-256) keypoint detector and occlusion-aware generator, ported from the spec.

Attribute names follow upstream so checkpoints load strictly (``state_dict_*.tsv``). Two switches
exist only in the generator, both described in the spec (sections a, b):

- ``deform_align_corners``: the deployed (Ascend-patched) pipeline warps the features and the
  source image with ``align_corners=True`` (default); upstream under torch >= 1.3 uses False.
- ``sampler``: ``grid_sample`` (ONNX GridSample, opset 16+) or ``gather`` (the guide's opset-11
  bilinear sampler built from floor, where-clipping and GatherElements, for ATC).

The driving jacobians are inverted in closed form (2x2 adjugate over the determinant): ONNX has no
matrix-inverse op and the exported graphs must not need one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_KP = 10
NUM_CHANNELS = 3
KP_VARIANCE = 0.01
TEMPERATURE = 0.1
SCALE_FACTOR = 0.25
SAMPLERS = ("grid_sample", "gather")


# -- building blocks --------------------------------------------------------------------------------
class DownBlock2d(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_features)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(F.relu(self.norm(self.conv(x))))


class UpBlock2d(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_features)

    def forward(self, x):
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2.0))))


class SameBlock2d(nn.Module):
    def __init__(self, in_features: int, out_features: int, kernel_size: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class ResBlock2d(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(features)
        self.norm2 = nn.BatchNorm2d(features)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out))) + x


class Encoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock2d(in_features if i == 0 else min(max_features, block_expansion * 2**i),
                        min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_blocks)
        )

    def forward(self, x):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for j, i in enumerate(reversed(range(num_blocks))):
            width = min(max_features, block_expansion * 2 ** (i + 1))
            blocks.append(UpBlock2d(width if j == 0 else 2 * width, min(max_features, block_expansion * 2**i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, skips):
        skips = list(skips)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return out


class Hourglass(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


def antialias_kernel(channels: int, scale: float) -> torch.Tensor:
    """The separable Gaussian (sigma = (1/scale - 1)/2) as a depthwise conv weight, summing to 1."""
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    t = torch.arange(size, dtype=torch.float32)
    gauss = torch.exp(-((t - (size - 1) / 2) ** 2) / (2 * sigma**2))
    kernel = gauss[:, None] * gauss[None, :]
    kernel = kernel / kernel.sum()
    return kernel.expand(channels, 1, size, size).contiguous()


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur, then keep every (1/scale)-th row and column: 256x256 -> 64x64 at scale 0.25."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        kernel = antialias_kernel(channels, scale)
        self.register_buffer("weight", kernel)
        self.pad = kernel.shape[-1] // 2
        self.groups = channels
        self.step = int(1 / scale)

    def forward(self, x):
        out = F.conv2d(F.pad(x, (self.pad,) * 4), self.weight, groups=self.groups)
        return out[:, :, :: self.step, :: self.step]


def coordinate_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(h, w, 2) grid of (x, y) in [-1, 1], x first."""
    xs = 2 * torch.arange(width, dtype=like.dtype) / (width - 1) - 1
    ys = 2 * torch.arange(height, dtype=like.dtype) / (height - 1) - 1
    return torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1)


def inverse_2x2(m: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of (..., 2, 2) matrices: adjugate over determinant (no Inverse op)."""
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    adjugate = torch.stack([torch.stack([d, -b], dim=-1), torch.stack([-c, a], dim=-1)], dim=-2)
    return adjugate / det[..., None, None]


# -- samplers ---------------------------------------------------------------------------------------
def gather_grid_sample(image: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinear sampling with zero padding from opset-11 ops (the guide's ATC variant).

    The image is padded by one zero pixel on every side, so every tap outside it reads a zero once
    its index is clipped into the padded frame. Index clipping uses ``where``: ``clamp`` on int64
    would export a ``Clip`` on int64, which ONNX Runtime rejects at opset 11 (spec g). Coordinates
    are clamped as floats first so that a wild sampling field cannot overflow the int32 indices of
    the 310P rewrite.
    """
    batch, channels, height, width = image.shape
    out_h, out_w = grid.shape[1], grid.shape[2]
    gx, gy = grid[..., 0], grid[..., 1]
    if align_corners:
        x = (gx + 1) / 2 * (width - 1)
        y = (gy + 1) / 2 * (height - 1)
    else:
        x = ((gx + 1) * width - 1) / 2
        y = ((gy + 1) * height - 1) / 2
    x = torch.clamp(x + 1, -1.0, width + 2.0)  # +1: the padding shifts pixel 0 to index 1
    y = torch.clamp(y + 1, -1.0, height + 2.0)
    x0f, y0f = torch.floor(x), torch.floor(y)
    wx1, wy1 = x - x0f, y - y0f
    wx0, wy0 = 1 - wx1, 1 - wy1
    x0, y0 = x0f.long(), y0f.long()
    x1, y1 = x0 + 1, y0 + 1
    padded = F.pad(image, (1, 1, 1, 1)).reshape(batch, channels, (height + 2) * (width + 2))

    def clip(index: torch.Tensor, largest: int) -> torch.Tensor:
        index = torch.where(index < 0, torch.zeros_like(index), index)
        return torch.where(index > largest, torch.full_like(index, largest), index)

    x0, x1, y0, y1 = clip(x0, width + 1), clip(x1, width + 1), clip(y0, height + 1), clip(y1, height + 1)

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        flat = (yi * (width + 2) + xi).reshape(batch, 1, out_h * out_w).expand(batch, channels, out_h * out_w)
        return torch.gather(padded, 2, flat).reshape(batch, channels, out_h, out_w)

    return (
        tap(y0, x0) * (wy0 * wx0)[:, None]
        + tap(y0, x1) * (wy0 * wx1)[:, None]
        + tap(y1, x0) * (wy1 * wx0)[:, None]
        + tap(y1, x1) * (wy1 * wx1)[:, None]
    )


def sample(image: torch.Tensor, grid: torch.Tensor, align_corners: bool, sampler: str) -> torch.Tensor:
    if sampler == "gather":
        return gather_grid_sample(image, grid, align_corners)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


# -- keypoint detector ------------------------------------------------------------------------------
class KPDetector(nn.Module):
    """Image (B,3,H,W) in [0,1] -> keypoints ``value`` (B,10,2) in [-1,1] and ``jacobian`` (B,10,2,2)."""

    def __init__(self, block_expansion=32, num_kp=NUM_KP, num_channels=NUM_CHANNELS, max_features=1024,
                 num_blocks=5, temperature=TEMPERATURE, scale_factor=SCALE_FACTOR):
        super().__init__()
        self.predictor = Hourglass(block_expansion, num_channels, num_blocks, max_features)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, 7)
        self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * num_kp, 7)
        self.down = AntiAliasInterpolation2d(num_channels, scale_factor)
        self.temperature = temperature
        self.num_kp = num_kp

    def forward(self, image):
        features = self.predictor(self.down(image))
        logits = self.kp(features)
        batch, kps, height, width = logits.shape
        heat = F.softmax(logits.reshape(batch, kps, -1) / self.temperature, dim=2).reshape(batch, kps, height, width)
        grid = coordinate_grid(height, width, heat)
        value = (heat[..., None] * grid).sum(dim=(2, 3))
        jac_map = self.jacobian(features).reshape(batch, kps, 4, height, width)
        jacobian = (heat[:, :, None] * jac_map).sum(dim=(3, 4)).reshape(batch, kps, 2, 2)
        return {"value": value, "jacobian": jacobian}


# -- generator --------------------------------------------------------------------------------------
class DenseMotionNetwork(nn.Module):
    def __init__(self, block_expansion=64, num_blocks=5, max_features=1024, num_kp=NUM_KP,
                 num_channels=NUM_CHANNELS, scale_factor=SCALE_FACTOR, sampler="grid_sample"):
        super().__init__()
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (num_channels + 1), num_blocks, max_features)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, 7, padding=3)
        self.occlusion = nn.Conv2d(self.hourglass.out_filters, 1, 7, padding=3)
        self.down = AntiAliasInterpolation2d(num_channels, scale_factor)
        self.sampler = sampler

    def forward(self, source, kp_driving_value, kp_driving_jac, kp_source_value, kp_source_jac):
        small = self.down(source)
        batch, channels, height, width = small.shape
        grid = coordinate_grid(height, width, small)  # (h, w, 2)

        def gaussians(value):
            offset = grid[None, None] - value[:, :, None, None, :]
            return torch.exp(-0.5 * (offset**2).sum(-1) / KP_VARIANCE)

        heat = gaussians(kp_driving_value) - gaussians(kp_source_value)
        heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1)  # (B, K+1, h, w)

        transform = torch.matmul(kp_source_jac, inverse_2x2(kp_driving_jac))  # (B, K, 2, 2)
        relative = grid[None, None] - kp_driving_value[:, :, None, None, :]  # (B, K, h, w, 2)
        moved = torch.matmul(transform[:, :, None, None], relative[..., None]).squeeze(-1)
        moved = moved + kp_source_value[:, :, None, None, :]
        identity = grid[None, None].expand(batch, 1, height, width, 2)
        motions = torch.cat([identity, moved], dim=1)  # (B, K+1, h, w, 2)
        kps = motions.shape[1]

        repeated = small[:, None].expand(batch, kps, channels, height, width).reshape(batch * kps, channels, height, width)
        deformed = sample(repeated, motions.reshape(batch * kps, height, width, 2), False, self.sampler)
        deformed = deformed.reshape(batch, kps, channels, height, width)

        hourglass_in = torch.cat([heat[:, :, None], deformed], dim=2).reshape(batch, kps * (channels + 1), height, width)
        features = self.hourglass(hourglass_in)
        mask = F.softmax(self.mask(features), dim=1)
        deformation = (mask[..., None] * motions).sum(dim=1)  # (B, h, w, 2)
        occlusion = torch.sigmoid(self.occlusion(features))
        return mask, deformed, occlusion, deformation


class OcclusionAwareGenerator(nn.Module):
    """(source, driving keypoints, source keypoints) -> mask, sparse_deformed, occlusion_map,
    deformed, prediction (the order of the ONNX outputs)."""

    def __init__(self, block_expansion=64, max_features=512, num_down_blocks=2, num_bottleneck_blocks=6,
                 num_channels=NUM_CHANNELS, sampler="grid_sample", deform_align_corners=True):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
        self.dense_motion_network = DenseMotionNetwork(sampler=sampler)
        self.first = SameBlock2d(num_channels, block_expansion, 7, 3)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(min(max_features, block_expansion * 2**i), min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_down_blocks)
        )
        self.up_blocks = nn.ModuleList(
            UpBlock2d(min(max_features, block_expansion * 2 ** (num_down_blocks - i)),
                      min(max_features, block_expansion * 2 ** (num_down_blocks - i - 1)))
            for i in range(num_down_blocks)
        )
        features = min(max_features, block_expansion * 2**num_down_blocks)
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(features))
        self.final = nn.Conv2d(block_expansion, num_channels, 7, padding=3)
        self.sampler = sampler
        self.deform_align_corners = deform_align_corners

    def forward(self, source_imgs, kp_driving_value, kp_driving_jac, kp_source_value, kp_source_jac):
        out = self.first(source_imgs)
        for block in self.down_blocks:
            out = block(out)
        mask, sparse_deformed, occlusion, deformation = self.dense_motion_network(
            source_imgs, kp_driving_value, kp_driving_jac, kp_source_value, kp_source_jac
        )
        out = sample(out, deformation, self.deform_align_corners, self.sampler) * occlusion
        field = F.interpolate(deformation.permute(0, 3, 1, 2), size=source_imgs.shape[2:], mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
        deformed = sample(source_imgs, field, self.deform_align_corners, self.sampler)
        out = self.bottleneck(out)
        for block in self.up_blocks:
            out = block(out)
        prediction = torch.sigmoid(self.final(out))
        return {"mask": mask, "sparse_deformed": sparse_deformed, "occlusion_map": occlusion,
                "deformed": deformed, "prediction": prediction}


def build_kp_detector() -> KPDetector:
    return KPDetector().eval()


def build_generator(sampler: str = "grid_sample", deform_align_corners: bool = True) -> OcclusionAwareGenerator:
    return OcclusionAwareGenerator(sampler=sampler, deform_align_corners=deform_align_corners).eval()
