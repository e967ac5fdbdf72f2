"""Small Tai-Chi-like test sets with known reconstruction scores, and the oracles that make them exact.

A clip shows 18 coloured squares (one colour per OpenPose joint) drifting over a grey background.
Three oracles stand in for the networks so the whole pipeline around them (clip decoding, source =
frame 0, per-frame driving, reconstruction PNG, re-reading it, pose preprocessing with flip test,
peak picking, pairing, AKD/MKR, L1) is checked against values computed here independently:

- ``kp_detector`` answers each frame with a code (its index in the set) written into the keypoints;
- ``generator`` answers a driving code with that frame, some joints' squares painted over, stored
  as (pixel + 0.5) / 255 so the saved uint8 reconstruction is exactly the painted frame;
- ``pose_estimator`` finds each colour square in its input and puts a unit Gaussian at its centre
  (stride 8), so identical content gives identical keypoints.

Then AKD is 0 (every joint found in both is at the same place), MKR is the share of visible joints
painted over, and L1 is the mean |painted + 0.5 - frame| / 255 of the construction.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np
from scipy.ndimage import label

from tooling.models.fomm.pose import HEATMAP_FLIP, NUM_JOINTS, STRIDE
from tooling.models.fomm.video import frames_to_input, read_clip, write_mp4

BACKGROUND = 96
SQUARE = 13  # pixels per side; survives the pose preprocessing's downscale (x0.25 at box 32)
# Distinct saturated colours (RGB), far from the grey background and from each other.
JOINT_COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
     [255, 128, 0], [128, 0, 255], [0, 255, 128], [255, 0, 128], [128, 255, 0], [0, 128, 255],
     [255, 255, 255], [0, 0, 0], [200, 100, 50], [50, 200, 100], [100, 50, 200], [200, 200, 100]],
    np.uint8,
)
MARKER_COLOUR = np.array([128, 64, 0], np.uint8)  # top-left only: its side says "mirrored"
COLOUR_TOLERANCE = 24  # max per-channel distance to count a pixel as a joint's colour
MIN_PATCH = 4  # pixels of the pose input a square must keep to be seen


def draw_frame(size: int, centres: np.ndarray, hidden: frozenset[int] = frozenset(), square: int = SQUARE) -> np.ndarray:
    """uint8 RGB frame with a square per joint at ``centres`` (18, 2) (x, y), except ``hidden`` ones."""
    frame = np.full((size, size, 3), BACKGROUND, np.uint8)
    frame[2 : 2 + SQUARE, 2 : 2 + SQUARE] = MARKER_COLOUR  # tells the oracle a mirrored frame apart
    half = square // 2
    for joint, (x, y) in enumerate(np.rint(centres).astype(int)):
        if joint not in hidden:
            frame[y - half : y + half + 1, x - half : x + half + 1] = JOINT_COLOURS[joint]
    return frame


def joint_layout(size: int, rng: np.random.Generator) -> np.ndarray:
    """18 well-separated square centres on a jittered 5x4 grid inside the frame."""
    margin = SQUARE + 8
    cells = [(c, r) for r in range(4) for c in range(5)][:NUM_JOINTS]
    step_x, step_y = (size - 2 * margin) / 4, (size - 2 * margin) / 3
    base = np.array([[margin + c * step_x, margin + r * step_y] for c, r in cells])
    return base + rng.uniform(-1.5, 1.5, base.shape)


def _patch(rgb: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(xs, ys) of the largest patch of ``colour``; single pixels where a resize blends two other
    colours into a look-alike are ignored."""
    labels, count = label(np.abs(rgb - colour.astype(np.float64)).max(axis=-1) <= COLOUR_TOLERANCE)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.max() < MIN_PATCH:
        return None
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return xs, ys


def _fingerprint(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array, np.float32).tobytes(), digest_size=16).digest()


@dataclass
class ReconstructionOracles:
    """Answers for the frames of one test set, registered by ``register_clip``."""

    frame_codes: dict[bytes, int] = field(default_factory=dict)
    reconstructions: dict[int, np.ndarray] = field(default_factory=dict)

    def register_clip(self, frames: np.ndarray, painted: list[np.ndarray]) -> None:
        for frame, target in zip(frames_to_input(frames), painted):
            code = len(self.reconstructions)
            self.frame_codes[_fingerprint(frame[None])] = code
            self.reconstructions[code] = (target.astype(np.float32).transpose(2, 0, 1) + 0.5) / 255

    @staticmethod
    def _code_values(code: int) -> np.ndarray:
        values = np.zeros((1, 10, 2), np.float32)
        values[0, 0, 0] = code / 1000.0
        return values

    def kp_detector(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _fingerprint(feeds["input"])
        if key not in self.frame_codes:
            raise KeyError("kp_detector oracle: a frame it did not prepare (the pipeline fed something unexpected)")
        jacobian = np.broadcast_to(np.eye(2, dtype=np.float32), (1, 10, 2, 2)).copy()
        return {"value": self._code_values(self.frame_codes[key]), "jacobian": jacobian}

    def generator(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        code = int(round(float(feeds["kp_driving_value"][0, 0, 0]) * 1000.0))
        if code not in self.reconstructions or _fingerprint(feeds["source_imgs"]) not in self.frame_codes:
            raise KeyError("generator oracle: driving keypoints or source frame it did not prepare")
        prediction = self.reconstructions[code][None]
        height, width = prediction.shape[2:]
        small = (height // 4, width // 4)
        return {
            "mask": np.full((1, 11, *small), 1 / 11, np.float32),
            "sparse_deformed": np.zeros((1, 11, 3, *small), np.float32),
            "occlusion_map": np.ones((1, 1, *small), np.float32),
            "deformed": prediction,
            "prediction": prediction,
        }

    @staticmethod
    def pose_estimator(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Unit Gaussians (sigma one cell) at each joint colour's centroid, on the stride-8 grid."""
        image = feeds["input"][0]  # normalised BGR, CHW
        bgr = np.rint((image + 0.5) * 256).clip(0, 255).transpose(1, 2, 0)
        rgb = bgr[..., ::-1]
        height, width = image.shape[1] // STRIDE, image.shape[2] // STRIDE
        heatmap = np.zeros((1, NUM_JOINTS + 1, height, width), np.float32)
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        marker = _patch(rgb, MARKER_COLOUR)
        # Like a real pose net, report the body's own joints: in a mirrored frame the square drawn
        # for the right shoulder is seen as the left one, which the flip fusion swaps back.
        mirrored = marker is not None and marker[0].mean() > rgb.shape[1] / 2
        for joint, colour in enumerate(JOINT_COLOURS):
            patch = _patch(rgb, colour)
            if patch is None:
                continue
            xs, ys = patch
            cx, cy = (xs.mean() + 0.5) / STRIDE - 0.5, (ys.mean() + 0.5) / STRIDE - 0.5
            channel = HEATMAP_FLIP[joint] if mirrored else joint
            heatmap[0, channel] = np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / 2)
        return {"heatmap": heatmap, "paf": np.zeros((1, 38, height, width), np.float32)}

    def as_dict(self) -> dict:
        return {"kp_detector": self.kp_detector, "generator": self.generator, "pose_estimator": self.pose_estimator}


@dataclass(frozen=True)
class SyntheticClip:
    name: str
    frames: int
    hidden: dict[int, frozenset[int]]  # frame -> joints painted over in the reconstruction
    as_folder: bool  # a folder of PNG frames instead of an mp4


# Two clips, one per reader (mp4 and frame folder); hidden joints make MKR non-zero.
KNOWN_ANSWER_CLIPS = (
    SyntheticClip("clipA#000100#000102.mp4", 2, {1: frozenset({2, 7, 0})}, as_folder=False),
    SyntheticClip("clipB#000200#000202", 2, {0: frozenset({17})}, as_folder=True),
)


def write_test_set(folder: Path, size: int, clips=KNOWN_ANSWER_CLIPS, seed: int = 0) -> tuple[ReconstructionOracles, dict[str, float]]:
    """Write the clips under ``folder`` and return the oracles plus the exact expected metrics."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    oracles = ReconstructionOracles()
    l1_frames, missing_rates = [], []
    for clip in clips:
        layout = joint_layout(size, rng)
        drift = np.cumsum(rng.integers(-2, 3, (clip.frames, 1, 2)), axis=0)
        drawn = np.stack([draw_frame(size, layout + d) for d in drift])
        path = folder / clip.name
        if clip.as_folder:
            path.mkdir()
            for t, frame in enumerate(drawn):
                cv2.imwrite(str(path / f"{t:07d}.png"), frame[..., ::-1])
        else:
            write_mp4(path, drawn)
        decoded = read_clip(path)  # what any reader of this set sees (mp4 is lossy)
        painted = []
        for t, (frame, d) in enumerate(zip(decoded, drift)):
            hidden = clip.hidden.get(t, frozenset())
            target = frame.copy()
            # Paint a margin too: mp4's chroma blur spreads a square's colour beyond its edge.
            wide = SQUARE + 8
            erased = (draw_frame(size, layout + d, square=wide) != draw_frame(size, layout + d, hidden, wide)).any(-1)
            target[erased] = BACKGROUND
            painted.append(target)
            l1_frames.append(np.abs(target.astype(np.float64) + 0.5 - frame.astype(np.float64)).mean() / 255)
            missing_rates.append(len(hidden) / NUM_JOINTS)
        oracles.register_clip(decoded, painted)
    total = len(l1_frames)
    expected = {"L1": float(np.mean(l1_frames)), "AKD": 0.0, "MKR": float(np.mean(missing_rates)),
                "frames": float(total), "akd_frames": float(total), "mkr_frames": float(total)}
    return oracles, expected
