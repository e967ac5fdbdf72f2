"""Human3.6M test-set reader and the guide's preprocessing (camera frame, normalisation, padding).

Input files (the guide's names): ``data_3d_h36m.npz`` with ``positions_3d[subject][action]`` world
positions in metres (T, 32, 3), and ``data_2d_h36m_cpn_ft_h36m_dbb.npz`` with
``positions_2d[subject][action]`` = four (T', 17, 2) pixel arrays (one per camera) plus
``metadata``. Each test sequence becomes one padded flip pair (2, L, 17, 2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tooling.models.videopose3d.network import ONE_SIDED_PAD
from tooling.validation import Problems, tolerated

TEST_SUBJECTS = ("S9", "S11")
NUM_JOINTS = 17
CAMERAS_FILE = Path(__file__).with_name("h36m_cameras.json")
# 2-D entries with no 3-D counterpart by design: the 3-D converter drops this recording as corrupted.
# Any other 2-D entry missing from the 3-D file is an error, never a sequence silently not scored.
DROPPED_BY_3D_CONVERTER = {("S11", "Directions")}


class DatasetError(ValueError):
    """A Human3.6M file is missing, unreadable or not shaped as the guide's preparation writes it."""


@dataclass(frozen=True)
class Camera:
    orientation: np.ndarray  # (4,) float32 quaternion w, x, y, z (camera -> world)
    translation: np.ndarray  # (3,) float32 metres
    res_w: int
    res_h: int


@dataclass(frozen=True)
class Sequence:
    stem: str  # "{k:03d}_{Action}", the guide's file stem
    action: str  # action group: the entry name before its first space
    subject: str
    entry: str
    camera: int
    keypoints_2d: np.ndarray  # (T, 17, 2) normalised screen coordinates
    positions_3d: np.ndarray  # (T, 17, 3) camera frame, joints 1.. relative to joint 0


@dataclass(frozen=True)
class Skeleton:
    kept_joints: tuple[int, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]


@cache
def camera_constants() -> tuple[dict[str, list[Camera]], Skeleton]:
    raw = json.loads(CAMERAS_FILE.read_text())
    cameras = {
        subject: [
            Camera(
                np.asarray(c["orientation_wxyz"], dtype=np.float32),
                np.asarray(c["translation_mm"], dtype=np.float32) / 1000,
                int(c["res_w"]),
                int(c["res_h"]),
            )
            for c in entries
        ]
        for subject, entries in raw["cameras"].items()
    }
    skeleton = Skeleton(tuple(raw["kept_joints_from_32"]), tuple(raw["joints_left_17"]), tuple(raw["joints_right_17"]))
    return cameras, skeleton


def quaternion_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate vectors v (..., 3) by unit quaternions q (..., 4) stored as w, x, y, z."""
    axis = q[..., 1:]
    uv = torch.cross(axis, v, dim=-1)
    uuv = torch.cross(axis, uv, dim=-1)
    return v + 2 * (q[..., :1] * uv + uuv)


def world_to_camera(points: np.ndarray, camera: Camera) -> np.ndarray:
    inverse = camera.orientation * np.array([1, -1, -1, -1], dtype=np.float32)
    q = torch.from_numpy(np.tile(inverse, (*points.shape[:-1], 1)))
    return quaternion_rotate(q, torch.from_numpy(points - camera.translation)).numpy()


def normalise_screen(pixels: np.ndarray, res_w: int, res_h: int) -> np.ndarray:
    """Map pixels to [-1, 1] along x with the aspect ratio kept (both axes divided by the width).

    The rounding reproduces the reference bit for bit: scale in float32, then subtract the
    float64 offsets and round back to float32.
    """
    scaled = pixels.astype(np.float32) / np.float32(res_w) * np.float32(2)
    offset = np.array([1.0, res_h / res_w], dtype=np.float64)
    return (scaled.astype(np.float64) - offset).astype(np.float32)


def mirror(poses: np.ndarray, skeleton: Skeleton) -> np.ndarray:
    """Horizontal mirror of (..., 17, C) poses: negate x and swap left and right joints."""
    out = poses.copy()
    out[..., 0] *= -1
    out[..., list(skeleton.left) + list(skeleton.right), :] = out[..., list(skeleton.right) + list(skeleton.left), :]
    return out


def _load_npz_dict(path: Path, key: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=True) as data:
            if key not in data.files:
                raise DatasetError(f"{path}: has no '{key}' entry (entries: {data.files})")
            array = data[key]
            if array.shape != ():
                raise DatasetError(
                    f"{path}: '{key}' holds an array of shape {array.shape}, expected a dict by subject")
            value = array.item()
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, pickle and format errors all mean "unreadable"
        raise DatasetError(f"{path}: not a readable npz archive ({exc})") from exc
    if not isinstance(value, dict):
        raise DatasetError(f"{path}: '{key}' holds {type(value).__name__}, expected a dict by subject")
    return value


def load_test_sequences(
    positions_3d_file: Path, keypoints_2d_file: Path, subjects: tuple[str, ...] = TEST_SUBJECTS
) -> list[Sequence]:
    """All test sequences grouped by action, numbered as the guide's preprocessing numbers them."""
    positions = _load_npz_dict(positions_3d_file, "positions_3d")
    detections = _load_npz_dict(keypoints_2d_file, "positions_2d")
    cameras, skeleton = camera_constants()
    check_metadata(keypoints_2d_file, skeleton)
    groups: dict[str, list[tuple[str, str]]] = {}
    for subject in subjects:
        if subject not in positions:
            raise DatasetError(f"{positions_3d_file}: subject {subject} missing (have {sorted(positions)})")
        if not isinstance(positions[subject], dict) or not positions[subject]:
            raise DatasetError(f"{positions_3d_file}: subject {subject} holds no actions")
        for entry in positions[subject]:
            groups.setdefault(entry.split(" ")[0], []).append((subject, entry))
    for subject in subjects:
        scored = set(positions[subject])
        unmatched = [e for e in _entries(detections, subject, keypoints_2d_file)
                     if e not in scored and (subject, e) not in DROPPED_BY_3D_CONVERTER]
        if unmatched:
            raise DatasetError(
                f"{positions_3d_file}: {subject} lacks {len(unmatched)} action(s) that "
                f"{keypoints_2d_file.name} has: {sorted(unmatched)} (they would go unscored)"
            )
    sequences = []
    for action, entries in groups.items():
        for subject, entry in entries:
            for cam_index, (pos, kps) in enumerate(
                _camera_views(positions, detections, subject, entry, cameras[subject], skeleton,
                              positions_3d_file, keypoints_2d_file)
            ):
                stem = f"{len(sequences) + 1:03d}_{action}"
                sequences.append(Sequence(stem, action, subject, entry, cam_index, kps, pos))
    return sequences


def check_metadata(keypoints_2d_file: Path, skeleton: Skeleton) -> None:
    """The 2-D file's ``metadata`` (joint count, left/right symmetry) agrees with the layout the
    network and the flip test are built for, or the file is refused. Upstream mirrors the 2-D input
    with the file's symmetry; a file declaring another one would be flipped differently there."""
    with np.load(keypoints_2d_file, allow_pickle=True) as data:
        metadata = data["metadata"].item() if "metadata" in data.files else None
    if metadata is None:
        tolerated(f"{keypoints_2d_file}: no 'metadata': the Human3.6M 17-joint layout and its left/right "
                  "symmetry are assumed")
        return
    if not isinstance(metadata, dict):
        raise DatasetError(f"{keypoints_2d_file}: 'metadata' holds {type(metadata).__name__}, expected a dict")
    problems = Problems(keypoints_2d_file)
    joints = metadata.get("num_joints", NUM_JOINTS)
    if joints != NUM_JOINTS:
        problems.add("metadata", f"declares num_joints {joints!r}, but the network and the 2-D arrays have "
                     f"{NUM_JOINTS}: refused")
    symmetry = metadata.get("keypoints_symmetry")
    expected = [list(skeleton.left), list(skeleton.right)]
    if symmetry is not None and _as_lists(symmetry) != expected:
        problems.add("metadata", f"declares keypoints_symmetry {_as_lists(symmetry)}, not the Human3.6M "
                     f"layout's {expected} that the flip test mirrors with: refused rather than flipped "
                     "differently from upstream")
    problems.raise_as(DatasetError)


def _as_lists(value) -> object:
    try:
        return [[int(j) for j in side] for side in value]
    except (TypeError, ValueError):
        return value


def _entries(detections: dict, subject: str, keypoints_2d_file: Path) -> list[str]:
    entries = detections.get(subject)
    if not isinstance(entries, dict):
        raise DatasetError(f"{keypoints_2d_file}: no detections for subject {subject}")
    return list(entries)


def _finite(values: np.ndarray, where: str) -> np.ndarray:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DatasetError(f"{where}: {bad} of {values.size} values are NaN or Inf")
    return values


def _numeric(raw, where: str) -> np.ndarray:
    try:
        return np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: not a numeric array ({exc})") from exc


def _camera_views(positions, detections, subject, entry, cameras, skeleton, positions_3d_file,
                  keypoints_2d_file) -> Iterator:
    where_3d = f"{positions_3d_file}: positions_3d[{subject}][{entry}]"
    world = _numeric(positions[subject][entry], where_3d)
    if world.ndim != 3 or world.shape[1:] != (32, 3):
        raise DatasetError(f"{where_3d}: shape {world.shape}, expected (T, 32, 3)")
    if world.shape[0] == 0:
        raise DatasetError(f"{where_3d}: holds no frames")
    _finite(world, where_3d)
    world = world[:, list(skeleton.kept_joints)]
    try:
        views = detections[subject][entry]
    except KeyError as exc:
        raise DatasetError(f"{keypoints_2d_file}: no detections for {subject} / {entry}") from exc
    if len(views) != len(cameras):
        raise DatasetError(f"{keypoints_2d_file}: {subject} / {entry} has {len(views)} cameras, expected {len(cameras)}")
    length = world.shape[0]
    for cam_index, (camera, kps) in enumerate(zip(cameras, views)):
        kps = _numeric(kps, f"{keypoints_2d_file}: {subject} / {entry} camera {cam_index}")
        if kps.ndim != 3 or kps.shape[1:] != (17, 2) or kps.shape[0] < length:
            raise DatasetError(
                f"{keypoints_2d_file}: {subject} / {entry} camera {cam_index}: shape {kps.shape}, "
                f"expected at least ({length}, 17, 2)"
            )
        _finite(kps[:length], f"{keypoints_2d_file}: {subject} / {entry} camera {cam_index}")
        cam = world_to_camera(world, camera)
        cam[:, 1:] -= cam[:, :1]
        yield cam, normalise_screen(kps[:length], camera.res_w, camera.res_h)


def padded_flip_pair(keypoints_2d: np.ndarray, length: int) -> tuple[np.ndarray, int]:
    """(T, 17, 2) -> (2, length, 17, 2) edge-padded sequence and its mirror, plus the extra end pad."""
    _, skeleton = camera_constants()
    frames = keypoints_2d.shape[0]
    delta = length - 2 * ONE_SIDED_PAD - frames
    if delta < 0:
        raise DatasetError(
            f"sequence of {frames} frames does not fit the {length}-frame input "
            f"(at most {length - 2 * ONE_SIDED_PAD} frames)"
        )
    padded = np.pad(keypoints_2d, ((ONE_SIDED_PAD, ONE_SIDED_PAD + delta), (0, 0), (0, 0)), mode="edge")
    return np.stack([padded, mirror(padded, skeleton)]).astype(np.float32), delta


def ground_truth_pair(positions_3d: np.ndarray) -> np.ndarray:
    _, skeleton = camera_constants()
    return np.stack([positions_3d, mirror(positions_3d, skeleton)]).astype(np.float32)
