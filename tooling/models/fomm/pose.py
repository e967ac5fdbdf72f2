"""Body keypoints of a frame as pose-evaluation's ``extract.py --type body_pose`` finds them (spec e3).

Preprocess (resize to the box, pad to the stride, normalise), run the pose network on the frame
and its mirror, bring both outputs back to frame size with OpenCV's cubic resize, fuse them, and
pick per joint the last peak in row-major order. PAF grouping does not change the result, so it is
not reproduced; the PAF fusion is kept for its golden.
"""
from __future__ import annotations

from typing import Callable, Mapping

import cv2
import numpy as np
from scipy.ndimage import generate_binary_structure, maximum_filter

BOX_SIZE = 368
STRIDE = 8
PEAK_THRESHOLD = 0.1
REFINE_RADIUS = 2
NUM_JOINTS = 18  # OpenPose COCO-18; heatmap channel 18 is the background
HEATMAP_FLIP = [0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16, 18]
PAF_FLIP = [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24, 25, 26, 27, 12, 13, 14, 15, 16, 17,
            18, 19, 28, 29, 32, 33, 30, 31, 36, 37, 34, 35]
MISSING = -1.0

PoseRunner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def network_input(frame_bgr: np.ndarray, box_size: int = BOX_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """(1, 3, H', W') float32 input and the resized (height, width) before stride padding."""
    scale = box_size / frame_bgr.shape[0]
    resized = cv2.resize(frame_bgr, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    height, width = resized.shape[:2]
    padded = np.zeros((-(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE, 3), np.uint8)
    padded[:height, :width] = resized
    tensor = padded.astype(np.float32) / np.float32(256) - np.float32(0.5)
    return np.ascontiguousarray(tensor.transpose(2, 0, 1)[None]), (height, width)


def to_frame_size(output: np.ndarray, resized_hw: tuple[int, int], frame_hw: tuple[int, int]) -> np.ndarray:
    """Network map (C, h, w) -> (H, W, C) at frame size: x8 cubic, crop the padding, cubic to the frame."""
    hwc = np.ascontiguousarray(output.transpose(1, 2, 0))
    up = cv2.resize(hwc, (0, 0), fx=STRIDE, fy=STRIDE, interpolation=cv2.INTER_CUBIC)
    up = up.reshape(up.shape[0], up.shape[1], -1)[: resized_hw[0], : resized_hw[1]]
    out = cv2.resize(up, (frame_hw[1], frame_hw[0]), interpolation=cv2.INTER_CUBIC)
    return out.reshape(frame_hw[0], frame_hw[1], -1)


def fuse_heatmaps(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Average a frame's heatmaps with its mirror's, mirrored back with left/right swapped (H, W, 19)."""
    return (plain + mirrored[:, ::-1][..., HEATMAP_FLIP]) / 2


def fuse_pafs(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The PAF counterpart: mirror, negate the x components (even channels), swap limbs, average."""
    back = mirrored[:, ::-1].copy()
    back[..., ::2] *= -1
    return (plain + back[..., PAF_FLIP]) / 2


def find_keypoints(heatmap: np.ndarray) -> np.ndarray:
    """(18, 2) float64 of integer (x, y) per joint from a fused (H, W, 19) map, -1 where missing.

    A peak equals the maximum of its 4-neighbour cross and exceeds 0.1; it moves to the first
    maximum of the 5x5 window around it. When a joint has several peaks the last in row-major
    order wins, as the numpy assignment in extract.py does.
    """
    keypoints = np.full((NUM_JOINTS, 2), MISSING)
    cross = generate_binary_structure(2, 1)
    height, width = heatmap.shape[:2]
    for joint in range(NUM_JOINTS):
        plane = heatmap[..., joint]
        peaks = (plane == maximum_filter(plane, footprint=cross)) & (plane > PEAK_THRESHOLD)
        ys, xs = np.nonzero(peaks)
        if len(ys) == 0:
            continue
        y, x = int(ys[-1]), int(xs[-1])
        top, left = max(0, y - REFINE_RADIUS), max(0, x - REFINE_RADIUS)
        window = plane[top : min(height, y + REFINE_RADIUS + 1), left : min(width, x + REFINE_RADIUS + 1)]
        row, col = np.unravel_index(int(np.argmax(window)), window.shape)
        keypoints[joint] = (left + col, top + row)
    return keypoints


def frame_keypoints(frame_rgb: np.ndarray, run: PoseRunner, box_size: int = BOX_SIZE) -> np.ndarray:
    """Keypoints (18, 2) of one uint8 RGB frame with the flip test."""
    bgr = np.ascontiguousarray(frame_rgb[..., ::-1])
    maps = []
    for image in (bgr, np.ascontiguousarray(bgr[:, ::-1])):
        tensor, resized_hw = network_input(image, box_size)
        heatmap = run({"input": tensor})["heatmap"][0]
        maps.append(to_frame_size(heatmap, resized_hw, frame_rgb.shape[:2]))
    return find_keypoints(fuse_heatmaps(*maps))
