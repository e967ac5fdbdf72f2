"""Reconstruction metrics: L1 (upstream reconstruction.py) and AKD / MKR (cmp_with_missing.py), spec e2, e4."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tooling.models.fomm.pose import MISSING, NUM_JOINTS


@dataclass(frozen=True)
class FrameKeypoints:
    """One row of extract.py's table: clip file name, frame number, (18, 2) keypoints."""

    file_name: str
    frame_number: int
    keypoints: np.ndarray


class PairingError(ValueError):
    """The generated set does not cover exactly the ground truth's clips and frames."""


def _stem(name: str) -> str:
    return name.split(".", 1)[0]


def frame_l1(prediction: np.ndarray, driving: np.ndarray) -> np.ndarray:
    """Per frame, the mean absolute difference over channels and pixels (both in [0, 1])."""
    diff = np.abs(np.asarray(prediction, np.float32) - np.asarray(driving, np.float32))
    return diff.reshape(len(diff), -1).mean(axis=1)


def akd_mkr(ground_truth: list[FrameKeypoints], generated: list[FrameKeypoints]) -> dict[str, float]:
    """Average keypoint distance (pixels) and missing keypoint rate, frame-weighted over all clips.

    Rows are sorted by (file name, frame) and paired by position; the pair must agree on the name
    before the first '.' (``X.mp4`` with ``X.mp4.png``) and on the frame number. A joint is missing
    where x == -1. AKD averages |gt - gen| over the joints present in both (both coordinates) per
    frame, then over frames that have such a joint; MKR averages, over frames with a labelled
    joint, the share of ground-truth joints the generated frame misses.
    """
    if len(ground_truth) != len(generated):
        raise PairingError(f"{len(ground_truth)} ground-truth frames but {len(generated)} generated frames")
    order = lambda row: (row.file_name, row.frame_number)  # noqa: E731
    distances, missing_rates = [], []
    for gt, gen in zip(sorted(ground_truth, key=order), sorted(generated, key=order)):
        if _stem(gt.file_name) != _stem(gen.file_name) or gt.frame_number != gen.frame_number:
            raise PairingError(
                f"row mismatch: ground truth {gt.file_name}#{gt.frame_number} vs generated {gen.file_name}#{gen.frame_number}"
            )
        g, p = np.asarray(gt.keypoints, np.float64), np.asarray(gen.keypoints, np.float64)
        gt_missing, gen_missing = g[:, 0] == MISSING, p[:, 0] == MISSING
        present = ~gt_missing & ~gen_missing
        labelled = NUM_JOINTS - int(gt_missing.sum())
        if labelled > 0:
            missing_rates.append(float((~gt_missing & gen_missing).sum()) / labelled)
        if present.any():
            distances.append(float(np.abs(g[present] - p[present]).mean()))
    return {
        "AKD": float(np.mean(distances)) if distances else float("nan"),
        "MKR": float(np.mean(missing_rates)) if missing_rates else float("nan"),
        "akd_frames": float(len(distances)),
        "mkr_frames": float(len(missing_rates)),
    }
