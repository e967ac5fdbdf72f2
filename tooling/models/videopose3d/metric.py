"""Flip fusion, MPJPE (Protocol 1) and Procrustes-aligned MPJPE (Protocol 2), action-wise."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from tooling.models.videopose3d.human36m import camera_constants, mirror


def fuse_flip_pair(prediction: np.ndarray, delta: int) -> np.ndarray:
    """(2, L, 17, 3) network output -> (T, 17, 3): drop the end padding, un-mirror row 1, average."""
    _, skeleton = camera_constants()
    pred = prediction[:, : prediction.shape[1] - delta] if delta > 0 else prediction
    pair = np.stack([pred[0], mirror(pred[1], skeleton)])
    return torch.from_numpy(pair).mean(dim=0).numpy()


def sequence_mpjpe(fused: np.ndarray, ground_truth_pair: np.ndarray) -> float:
    """Mean joint error in metres against row 0 of the ground truth with its root zeroed."""
    gt = ground_truth_pair[0].copy()
    gt[:, 0] = 0
    distances = torch.linalg.vector_norm(torch.from_numpy(fused) - torch.from_numpy(gt), dim=-1)
    return float(distances.mean())


def procrustes_mpjpe(fused: np.ndarray, ground_truth_pair: np.ndarray) -> float:
    """Mean joint error after a per-frame similarity alignment (rotation, scale, translation)."""
    gt = ground_truth_pair[0].astype(np.float64).copy()
    gt[:, 0] = 0
    pred = fused.astype(np.float64)
    mu_p, mu_g = pred.mean(axis=1, keepdims=True), gt.mean(axis=1, keepdims=True)
    p0, g0 = pred - mu_p, gt - mu_g
    norm_p = np.linalg.norm(p0, axis=(1, 2), keepdims=True)
    norm_g = np.linalg.norm(g0, axis=(1, 2), keepdims=True)
    p0, g0 = p0 / np.maximum(norm_p, 1e-12), g0 / np.maximum(norm_g, 1e-12)
    u, s, vt = np.linalg.svd(np.swapaxes(g0, 1, 2) @ p0)
    v = np.swapaxes(vt, 1, 2)
    rotation = v @ np.swapaxes(u, 1, 2)
    # A reflection is not a valid alignment: flip the weakest axis when det(R) < 0.
    sign = np.sign(np.linalg.det(rotation))[:, None]
    v[:, :, -1] *= sign
    s[:, -1] *= sign[:, 0]
    rotation = v @ np.swapaxes(u, 1, 2)
    scale = (s.sum(axis=1, keepdims=True)[..., None]) * norm_g / np.maximum(norm_p, 1e-12)
    aligned = scale * (pred - mu_p) @ rotation + mu_g
    return float(np.linalg.norm(aligned - gt, axis=-1).mean())


@dataclass(frozen=True)
class SequenceError:
    action: str
    frames: int
    mpjpe_m: float
    p_mpjpe_m: float


def action_wise(errors: Iterable[SequenceError], field: str = "mpjpe_m") -> tuple[dict[str, float], float]:
    """Frame-weighted error per action (mm) and their unweighted mean, as the guide reports it."""
    sums: dict[str, float] = {}
    frames: dict[str, int] = {}
    for e in errors:
        sums[e.action] = sums.get(e.action, 0.0) + e.frames * getattr(e, field)
        frames[e.action] = frames.get(e.action, 0) + e.frames
    per_action = {a: 1000.0 * sums[a] / frames[a] for a in sums}
    return per_action, float(np.mean(list(per_action.values()))) if per_action else float("nan")
