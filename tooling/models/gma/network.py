"""GMA (RAFT with global motion aggregation), clean-room from shared/specs/gma/spec.md §1-3.

Attribute names and registration order reproduce upstream's state_dict (185 keys, including the
cnet BatchNorm registered as both ``norm3`` and ``downsample.1``, the unused relative-position
tables and the int64 ``rel_ind`` buffer). Attention and aggregation are plain matmuls (the
guide's patch; same math as upstream's einsums). The correlation sampler is the export variant.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tooling.models.gma.correlation import SAMPLERS, Sampler, correlation_pyramid, lookup

INPUT_NAMES = ("image1", "image2")
OUTPUT_NAME = "out1"
DEFAULT_ITERS = 6  # the export unrolls six refinement iterations (spec §3)
HIDDEN_DIM = CONTEXT_DIM = 128
MAX_POS_SIZE = 160
DIM_HEAD = 128
MIN_FEATURE_SIZE = 16  # every pyramid level needs >= 2 pixels per side (spec §2.5): H, W >= 128
STRIDE = 8

Record = dict[str, torch.Tensor] | None


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module], stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.relu = nn.ReLU()
        self.norm1 = norm(cout)
        self.norm2 = norm(cout)
        if stride != 1:
            # One module under two names, as upstream registers it (both key sets in the state_dict).
            self.norm3 = norm(cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), self.norm3)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(shortcut + y)


class BasicEncoder(nn.Module):
    """Output stride 8, 256 channels; ``norm`` is InstanceNorm (fnet) or BatchNorm (cnet)."""

    def __init__(self, norm: Callable[[int], nn.Module], output_dim: int = 256):
        super().__init__()
        self.norm1 = norm(64)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.relu1 = nn.ReLU()
        self.layer1 = nn.Sequential(ResidualBlock(64, 64, norm, 1), ResidualBlock(64, 64, norm, 1))
        self.layer2 = nn.Sequential(ResidualBlock(64, 96, norm, 2), ResidualBlock(96, 96, norm, 1))
        self.layer3 = nn.Sequential(ResidualBlock(96, 128, norm, 2), ResidualBlock(128, 128, norm, 1))
        self.conv2 = nn.Conv2d(128, output_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


def instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels)  # affine=False, no running stats: no state_dict entries


class BasicMotionEncoder(nn.Module):
    def __init__(self, corr_channels: int):
        super().__init__()
        self.convc1 = nn.Conv2d(corr_channels, 256, 1)
        self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
        self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
        self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv = nn.Conv2d(192 + 64, 128 - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([cor, flo], dim=1))), flow], dim=1)


class SepConvGRU(nn.Module):
    def __init__(self, hidden: int = HIDDEN_DIM, inputs: int = 384):
        super().__init__()
        for suffix, kernel, pad in (("1", (1, 5), (0, 2)), ("2", (5, 1), (2, 0))):
            for gate in ("z", "r", "q"):
                setattr(self, f"conv{gate}{suffix}", nn.Conv2d(hidden + inputs, hidden, kernel, padding=pad))

    def _pass(self, h: torch.Tensor, x: torch.Tensor, suffix: str) -> torch.Tensor:
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(getattr(self, f"convz{suffix}")(hx))
        r = torch.sigmoid(getattr(self, f"convr{suffix}")(hx))
        q = torch.tanh(getattr(self, f"convq{suffix}")(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._pass(self._pass(h, x, "1"), x, "2")  # horizontal, then vertical


class FlowHead(nn.Module):
    def __init__(self, dim: int = HIDDEN_DIM, hidden: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


class Aggregate(nn.Module):
    """motion + gamma * (attention @ to_v(motion)); heads 1, dim_head 128, so no projection."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.to_v = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, attention: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = motion.shape
        v = self.to_v(motion).reshape(batch, 1, channels, height * width).transpose(2, 3)
        aggregated = torch.matmul(attention, v).transpose(2, 3).reshape(batch, channels, height, width)
        return motion + self.gamma * aggregated


class GMAUpdateBlock(nn.Module):
    def __init__(self, corr_channels: int):
        super().__init__()
        self.encoder = BasicMotionEncoder(corr_channels)
        self.gru = SepConvGRU(HIDDEN_DIM, 128 + HIDDEN_DIM + HIDDEN_DIM)
        self.flow_head = FlowHead(HIDDEN_DIM, 256)
        self.mask = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 64 * 9, 1))
        self.aggregator = Aggregate(128)

    def forward(self, net, inp, corr, flow, attention, record: Record = None):
        motion = self.encoder(flow, corr)
        motion_global = self.aggregator(attention, motion)
        if record is not None:
            record.setdefault("motion_it0", motion)
            record.setdefault("motion_global_it0", motion_global)
        net = self.gru(net, torch.cat([inp, motion, motion_global], dim=1))
        return net, 0.25 * self.mask(net), self.flow_head(net)


class RelPosEmb(nn.Module):
    """Relative-position tables kept for the checkpoint layout; unused in the guide's config."""

    def __init__(self, max_pos_size: int = MAX_POS_SIZE, dim_head: int = DIM_HEAD):
        super().__init__()
        self.rel_height = nn.Embedding(2 * max_pos_size - 1, dim_head)
        self.rel_width = nn.Embedding(2 * max_pos_size - 1, dim_head)
        positions = torch.arange(max_pos_size)
        self.register_buffer("rel_ind", positions[None, :] - positions[:, None] + max_pos_size - 1)


class Attention(nn.Module):
    """Content-only self-similarity of the context features: softmax_j(q_i . k_j), q scaled."""

    def __init__(self, dim: int = 128, dim_head: int = DIM_HEAD):
        super().__init__()
        self.scale = dim_head**-0.5
        self.to_qk = nn.Conv2d(dim, 2 * dim_head, 1, bias=False)
        self.pos_emb = RelPosEmb(MAX_POS_SIZE, dim_head)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = context.shape
        q, k = self.to_qk(context).chunk(2, dim=1)
        q = (self.scale * q).reshape(batch, 1, -1, height * width).transpose(2, 3)
        k = k.reshape(batch, 1, -1, height * width)
        return torch.matmul(q, k).softmax(dim=-1)


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) -> (B, 2, 8h, 8w): softmax-weighted 3x3 neighbourhoods of 8*flow, zero padded."""
    batch, _, height, width = flow.shape
    mask = mask.reshape(batch, 1, 9, STRIDE, STRIDE, height, width).softmax(dim=2)
    patches = F.unfold(STRIDE * flow, [3, 3], padding=1).reshape(batch, 2, 9, 1, 1, height, width)
    up = (mask * patches).sum(dim=2)  # (B, 2, 8, 8, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(batch, 2, STRIDE * height, STRIDE * width)


def pixel_grid(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): channel 0 the column (x), channel 1 the row (y)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([cols, rows]).to(like.dtype)[None].expand(batch, 2, height, width)


class RAFTGMA(nn.Module):
    """Forward: (image1, image2 RGB 0..255, B x 3 x H x W) -> flow in pixels, B x 2 x H x W."""

    def __init__(self, sampler: Sampler = "grid_sample", iters: int = DEFAULT_ITERS):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown correlation sampler {sampler!r}; known: {SAMPLERS}")
        self.sampler = sampler
        self.iters = iters
        self.fnet = BasicEncoder(instance_norm, 256)
        self.cnet = BasicEncoder(nn.BatchNorm2d, HIDDEN_DIM + CONTEXT_DIM)
        self.update_block = GMAUpdateBlock(corr_channels=4 * 81)
        self.att = Attention(CONTEXT_DIM, DIM_HEAD)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        return self.estimate(image1, image2)

    def estimate(self, image1: torch.Tensor, image2: torch.Tensor, iters: int | None = None,
                 record: Record = None) -> torch.Tensor:
        """The final upsampled flow; ``record`` (a dict) collects the spec's §8 debug stages."""
        batch, _, height, width = image1.shape
        if height < STRIDE * MIN_FEATURE_SIZE or width < STRIDE * MIN_FEATURE_SIZE:
            raise ValueError(f"GMA needs inputs of at least {STRIDE * MIN_FEATURE_SIZE} x "
                             f"{STRIDE * MIN_FEATURE_SIZE} (got {height} x {width}): smaller pyramids give NaN")
        image1 = 2 * (image1 / 255.0) - 1
        image2 = 2 * (image2 / 255.0) - 1
        fmap1, fmap2 = self.fnet(torch.cat([image1, image2], dim=0)).split(batch, dim=0)
        pyramid = correlation_pyramid(fmap1, fmap2)
        context = self.cnet(image1)
        net, inp = torch.tanh(context[:, :HIDDEN_DIM]), torch.relu(context[:, HIDDEN_DIM:])
        attention = self.att(inp)
        coords0 = pixel_grid(batch, height // STRIDE, width // STRIDE, fmap1)
        coords1 = coords0
        if record is not None:
            record.update(fmap1=fmap1, fmap2=fmap2, cnet=context, attention=attention)
        up_mask = None
        for step in range(self.iters if iters is None else iters):
            corr = lookup(pyramid, coords1, self.sampler)
            if record is not None:
                record.setdefault("corr_it0", corr)
            net, up_mask, delta = self.update_block(net, inp, corr, coords1 - coords0, attention, record)
            coords1 = coords1 + delta
            if record is not None:
                record[f"flow_low_it{step}"] = coords1 - coords0
        return convex_upsample(coords1 - coords0, up_mask)


def build_gma(sampler: Sampler = "grid_sample", iters: int = DEFAULT_ITERS) -> RAFTGMA:
    return RAFTGMA(sampler, iters).eval()
