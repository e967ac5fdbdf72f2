"""All-pairs correlation pyramid and its windowed lookup (spec §2.5), with two bilinear samplers.

``grid_sample`` uses ``F.grid_sample`` (ONNX GridSample, opset 16+); ``gather`` is the guide's
opset-12 path: zero-pad by one pixel, fetch the four corners with a gather at integer indices,
blend with weights from the unclamped coordinates. Both compute plain bilinear interpolation at pixel positions with
zero contribution from corners outside the image.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Sampler = Literal["grid_sample", "gather"]
SAMPLERS: tuple[Sampler, ...] = ("grid_sample", "gather")
LEVELS = 4
RADIUS = 4


def sample_grid_sample(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``image`` (N, C, H, W) at pixel ``points`` (N, h, w, 2: x, y) -> (N, C, h, w)."""
    height, width = image.shape[-2:]
    x, y = points.unbind(-1)
    grid = torch.stack((2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def sample_gather(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Same contract as ``sample_grid_sample``, built from Pad, Floor, integer Where and GatherElements."""
    batch, channels, height, width = image.shape
    _, out_h, out_w, _ = points.shape
    padded = F.pad(image, (1, 1, 1, 1)).reshape(batch, channels, (height + 2) * (width + 2))
    x = points[..., 0].reshape(batch, 1, out_h * out_w) + 1  # into the padded image
    y = points[..., 1].reshape(batch, 1, out_h * out_w) + 1
    x0, y0 = torch.floor(x), torch.floor(y)
    x1, y1 = x0 + 1, y0 + 1
    # Weights from the unclamped corners; a corner clamped onto the zero border then adds 0.
    corners = ((x0, y0, (x1 - x) * (y1 - y)), (x1, y0, (x - x0) * (y1 - y)),
               (x0, y1, (x1 - x) * (y - y0)), (x1, y1, (x - x0) * (y - y0)))
    result = None
    for cx, cy, weight in corners:
        # Integer corner and flat-index arithmetic, as mmcv's sampler does it: ATC runs float
        # arithmetic in fp16, where integers past 2048 are not all representable, so a flat index
        # computed in float fetched neighbouring cells of a 440 x 1024 pyramid (57 x 130 cells).
        # Clipped with where, as there: the graph ATC takes holds no Clip on integers.
        cx = _clip(cx.to(torch.int64), width + 1)
        cy = _clip(cy.to(torch.int64), height + 1)
        index = (cy * (width + 2) + cx).expand(batch, channels, out_h * out_w)
        term = torch.gather(padded, 2, index) * weight
        result = term if result is None else result + term
    return result.reshape(batch, channels, out_h, out_w)


def _clip(index: torch.Tensor, largest: int) -> torch.Tensor:
    # Scalar bounds: a traced zeros_like is a constant the size of the index (18 MB each at
    # 440 x 1024 batch 4; 3.3 GB of them in the graph).
    index = torch.where(index < 0, index.new_zeros(()), index)
    return torch.where(index > largest, index.new_full((), largest), index)


SAMPLE = {"grid_sample": sample_grid_sample, "gather": sample_gather}


def correlation_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int = LEVELS) -> list[torch.Tensor]:
    """Level 0: <fmap1_i, fmap2_j> / sqrt(C) as B*P single-channel h x w images; then 2x2 average pools."""
    batch, dim, height, width = fmap1.shape
    corr = torch.matmul(fmap1.reshape(batch, dim, height * width).transpose(1, 2),
                        fmap2.reshape(batch, dim, height * width))
    corr = (corr / dim**0.5).reshape(batch * height * width, 1, height, width)
    pyramid = [corr]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
    return pyramid


def window_offsets(radius: int = RADIUS) -> torch.Tensor:
    """(2r+1, 2r+1, 2) offsets added to (x, y); the first index moves x (RAFT's channel order)."""
    steps = torch.linspace(-radius, radius, 2 * radius + 1)
    along_x, along_y = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack((along_x, along_y), dim=-1)


def lookup(pyramid: list[torch.Tensor], coords: torch.Tensor, sampler: Sampler, radius: int = RADIUS) -> torch.Tensor:
    """Correlation windows around ``coords`` (B, 2, h, w) at every level -> (B, levels*(2r+1)^2, h, w)."""
    batch, _, height, width = coords.shape
    centres = coords.permute(0, 2, 3, 1).reshape(batch * height * width, 1, 1, 2)
    offsets = window_offsets(radius).to(coords.dtype).reshape(1, 2 * radius + 1, 2 * radius + 1, 2)
    sample = SAMPLE[sampler]
    windows = []
    for level, corr in enumerate(pyramid):
        points = centres / 2**level + offsets
        windows.append(sample(corr, points).reshape(batch, height, width, -1))
    return torch.cat(windows, dim=-1).permute(0, 3, 1, 2).contiguous()
