"""Closed-form pieces for calibrating seeded networks on a generated set (``calibrate_agreement``).

A slice keeps its network's seeded trunk and sets a few layers so that the output carries the
generated set's answer: a ridge least-squares readout from torch eager features, a batch norm that
passes its input through, a residual branch switched off. Everything here is deterministic
(float64 normal equations, no iteration), so the same features give the same checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_RIDGE = 1e-3


def ridge_readout(features: np.ndarray, targets: np.ndarray, sample_weight: np.ndarray | None = None,
                  ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, F), bias (K,)) minimising sum_i w_i |W f_i + b - t_i|^2 + ridge |W, b|^2 for
    features (N, F) and targets (N, K)."""
    design = np.hstack([np.asarray(features, np.float64), np.ones((len(features), 1))])
    targets = np.asarray(targets, np.float64)
    if sample_weight is not None:
        root = np.sqrt(np.asarray(sample_weight, np.float64))[:, None]
        design, targets = design * root, targets * root
    gram = design.T @ design + ridge * np.eye(design.shape[1])
    solution = np.linalg.solve(gram, design.T @ targets)
    return solution[:-1].T, solution[-1]


def channels_last(feature_map: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C) rows, one per pixel, in the order targets are flattened."""
    return feature_map.detach().permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1]).double().numpy()


@torch.no_grad()
def set_conv1x1(conv: torch.nn.Conv2d, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
    """Write a (out, in) matrix (and bias) into a 1x1 convolution; rows past ``weight``'s are zeroed."""
    full = torch.zeros_like(conv.weight)
    full[: weight.shape[0], :, 0, 0] = torch.from_numpy(np.asarray(weight)).to(full.dtype)
    conv.weight.copy_(full)
    if conv.bias is not None:
        values = torch.zeros_like(conv.bias)
        if bias is not None:
            values[: len(bias)] = torch.from_numpy(np.asarray(bias)).to(values.dtype)
        conv.bias.copy_(values)


@torch.no_grad()
def pass_through_batchnorm(bn: torch.nn.BatchNorm2d, bias: np.ndarray | None = None) -> None:
    """Make an eval-mode batch norm the identity (plus ``bias`` on its first channels)."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(1.0)
    bn.bias.zero_()
    if bias is not None:
        bn.bias[: len(bias)] = torch.from_numpy(np.asarray(bias)).to(bn.bias.dtype)


@torch.no_grad()
def silence(bn: torch.nn.BatchNorm2d) -> None:
    """Zero a batch norm's output: the residual branch it closes adds nothing (the block is the
    identity on its non-negative input, still computed by the backend)."""
    bn.weight.zero_()
    bn.bias.zero_()


@torch.no_grad()
def carry_channels(conv: torch.nn.Conv2d, channels, in_offset: int = 0) -> None:
    """Make a convolution copy input channel ``c + in_offset`` to output channel ``c`` for each of
    ``channels`` (its centre tap 1, every other weight and the bias 0): the layer carries them
    through unchanged, and a ReLU after it keeps them where they are non-negative."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    centre_y, centre_x = conv.weight.shape[-2] // 2, conv.weight.shape[-1] // 2
    for c in channels:
        conv.weight[c, c + in_offset, centre_y, centre_x] = 1.0
