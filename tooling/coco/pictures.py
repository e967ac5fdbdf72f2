"""Keypoint disagreement pictures shared by the COCO models (TransPose, DEKR)."""
from __future__ import annotations

import numpy as np

from tooling.coco.synthetic import SKELETON
from tooling.pictures import heat, keypoints_over, panel


def worst_item(reference: np.ndarray, actual: np.ndarray) -> int:
    """The batch item whose outputs differ most."""
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(reference, np.float64))
    return int(diff.reshape(len(diff), -1).max(axis=1).argmax())


def keypoint_disagreement(image_chw: np.ndarray, reference_poses: np.ndarray, actual_poses: np.ndarray,
                          reference_heat: np.ndarray, actual_heat: np.ndarray, backend_label: str = "backend") -> np.ndarray:
    """The input with every pose's 17 keypoints and limbs of torch eager (green dots) and the
    backend (red crosses), next to the largest |difference| of the heatmaps across joints."""
    diff = np.abs(np.asarray(actual_heat, np.float64) - np.asarray(reference_heat, np.float64)).max(axis=0)
    reference_poses, actual_poses = reference_poses[..., :2], actual_poses[..., :2]
    tiles = [keypoints_over(image_chw, reference_poses.reshape(-1, 2), actual_poses.reshape(-1, 2),
                            "keypoints: torch (green) vs " + backend_label + " (red)",
                            edges=[(a + 17 * p, b + 17 * p) for p in range(len(reference_poses)) for a, b in SKELETON]
                            if len(reference_poses) == len(actual_poses) else ()),
             heat(diff, "|heatmap difference|")]
    same = actual_poses.shape == reference_poses.shape and actual_poses.size
    moved = f"{np.abs(actual_poses - reference_poses).max():.3g} px" if same else "n/a (different pose counts)"
    return panel(tiles, footer=f"largest keypoint move {moved}; {len(reference_poses)} vs {len(actual_poses)} pose(s)")
