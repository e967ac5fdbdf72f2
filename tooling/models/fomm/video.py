"""Tai-Chi clips in, reconstructions out (spec d, e1).

A clip is an mp4 (decoded with OpenCV), a folder of frame images (sorted by name), or a stacked
PNG holding the frames side by side along the width (upstream's ``taichi-png`` layout and the
reconstruction format). Frames are uint8 RGB (T, H, W, 3).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tooling.coco.dataset import ImageReadError, image_size
from tooling.validation import Problems

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class VideoError(ValueError):
    """A clip that cannot be read as frames; the message names the file."""


def list_clips(folder: Path) -> list[Path]:
    """The clips of a test folder in name order (the metric pairs clips by name, so order is free)."""
    if not folder.is_dir():
        raise VideoError(f"{folder}: not a folder of clips")
    return sorted(p for p in folder.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)


def check_clips(clips: list[Path], width: int, height: int) -> None:
    """Every clip holds frames of the size the networks were exported for, one size per clip,
    read from container properties and image headers (nothing decoded). Upstream's reconstruction
    feeds each clip's frames as they are, so a clip of another size would be scored at a shape the
    deployed networks do not take, or not at all."""
    if not clips:
        return
    problems = Problems(clips[0].parent)
    for clip in clips:
        sizes = _clip_frame_sizes(clip, problems)
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{name} is {w} x {h}" for name, (w, h) in list(sizes.items())[:4])
            problems.add(f"clip {clip.name}", f"mixes frame sizes ({listed})")
        elif sizes and next(iter(sizes.values())) != (width, height):
            w, h = next(iter(sizes.values()))
            problems.add(f"clip {clip.name}", f"has {w} x {h} frames; the networks take {width} x {height}")
    problems.raise_as(VideoError)


def _clip_frame_sizes(clip: Path, problems: Problems) -> dict[str, tuple[int, int]]:
    """Frame name -> (width, height) of each distinct size found in ``clip`` (first frame of each)."""
    if clip.is_dir():
        files = sorted(p for p in clip.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            problems.add(f"clip {clip.name}", "is a frame folder without images")
        sizes: dict[str, tuple[int, int]] = {}
        for path in files:
            try:
                size = image_size(path)
            except ImageReadError as exc:
                problems.add(f"clip {clip.name} / {path.name}", f"is not a readable image ({exc})")
                continue
            if size not in sizes.values():
                sizes[path.name] = size
        return sizes
    if clip.suffix.lower() in IMAGE_SUFFIXES:
        try:
            width, height = image_size(clip)
        except ImageReadError as exc:
            problems.add(f"clip {clip.name}", f"is not a readable image ({exc})")
            return {}
        if width % height:
            problems.add(f"clip {clip.name}", f"is a {width} x {height} strip, not square frames side by side")
        return {clip.name: (height, height)}
    capture = cv2.VideoCapture(str(clip))
    try:
        if not capture.isOpened() or capture.get(cv2.CAP_PROP_FRAME_COUNT) < 1:
            problems.add(f"clip {clip.name}", "cannot be opened by OpenCV or holds no frame")
            return {}
        return {clip.name: (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))}
    finally:
        capture.release()


def _read_image_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise VideoError(f"{path}: not a readable image")
    return np.ascontiguousarray(image[..., ::-1])


def read_clip(path: Path) -> np.ndarray:
    """All frames of a clip as uint8 RGB (T, H, W, 3)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoError(f"{path}: a frame folder without images")
        frames = [_read_image_rgb(f) for f in files]
        if len({f.shape for f in frames}) != 1:
            raise VideoError(f"{path}: frames differ in size")
        return np.stack(frames)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return split_stacked(_read_image_rgb(path), path)
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame[..., ::-1])
    finally:
        capture.release()
    if not frames:
        raise VideoError(f"{path}: OpenCV decoded no frame (missing file, unknown codec or empty clip)")
    return np.ascontiguousarray(np.stack(frames))


def clip_frame_count(path: Path) -> int:
    """Frames in a clip without decoding it where the container says (for progress totals)."""
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        height, width = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_2).shape[:2]
        return max(1, width // height)
    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()


def split_stacked(image: np.ndarray, where: Path | str = "stacked image") -> np.ndarray:
    """(H, H*T, 3) -> (T, H, H, 3): square frames side by side along the width; alpha dropped."""
    image = image[..., :3]
    height, width = image.shape[:2]
    if width % height:
        raise VideoError(f"{where}: width {width} is not a multiple of the frame height {height}")
    return np.ascontiguousarray(image.reshape(height, width // height, height, 3).transpose(1, 0, 2, 3))


def frames_to_input(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) -> float32 NCHW in [0, 1] (skimage's img_as_float32: value / 255)."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def reconstruction_image(predictions: np.ndarray) -> np.ndarray:
    """Predictions (T, 3, H, W) in (0, 1) -> the saved strip (H, W*T, 3) uint8: x255 then truncated,
    no rounding and no clipping, in float32 as upstream (spec e1)."""
    hwc = np.asarray(predictions, dtype=np.float32).transpose(0, 2, 3, 1)
    strip = np.concatenate(list(hwc), axis=1)
    return (strip * np.float32(255)).astype(np.uint8)


def save_reconstruction(folder: Path, clip: Path, predictions: np.ndarray) -> Path:
    """Write ``<clip name>.png`` (e.g. ``X.mp4.png``) atomically; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{clip.name}.png"
    partial = folder / f".{clip.name}.partial.png"
    if not cv2.imwrite(str(partial), reconstruction_image(predictions)[..., ::-1]):
        raise VideoError(f"{partial}: OpenCV could not write the reconstruction")
    partial.replace(target)
    return target


def write_mp4(path: Path, frames: np.ndarray, fps: float = 25.0) -> None:
    """uint8 RGB frames to an mp4 (mp4v); lossy, so readers must decode it rather than trust the input."""
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write mp4 here")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
    finally:
        writer.release()
