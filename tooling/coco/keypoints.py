"""COCO person-keypoint conventions shared by every keypoint model in the suite."""
from __future__ import annotations

import numpy as np

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
PERSON_CATEGORY_ID = 1

# Left/right joint pairs that trade places when an image is mirrored.
FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16),
)

# Per-joint OKS falloff used by COCOeval (and by OKS-NMS), in units of the object scale.
OKS_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72,
     0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89],
    dtype=np.float64,
) / 10.0


def flip_permutation(num_joints: int = NUM_KEYPOINTS,
                     pairs: tuple[tuple[int, int], ...] = FLIP_PAIRS) -> np.ndarray:
    """Index array p such that ``mirrored[:, j] = maps[:, p[j]]`` swaps every left/right pair."""
    permutation = np.arange(num_joints)
    for left, right in pairs:
        permutation[left], permutation[right] = right, left
    return permutation
