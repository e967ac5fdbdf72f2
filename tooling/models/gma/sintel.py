"""MPI-Sintel training split: frame pairs of a pass, enumerated as the guide's preprocessing does.

Layout (below ``<data-root>/sintel/training``): ``<pass>/<scene>/frame_%04d.png`` for the clean
and final passes, ``flow/<scene>/frame_%04d.flo`` shared by both. Scenes in name order; a scene
with N frames gives pairs (frame_i, frame_i+1, flow frame_i) for i = 1 .. N-1; one global index
numbers the pairs across scenes (1041 per pass in the full set).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tooling.coco.dataset import ImageReadError, read_image

PASSES = ("clean", "final")
DATA = {"clean": "sintel/training/clean", "final": "sintel/training/final", "flow": "sintel/training/flow"}


class SintelLayoutError(ValueError):
    """A staged Sintel tree is missing a file the enumeration needs."""


@dataclass(frozen=True)
class SintelPair:
    index: int
    scene: str
    frame1: Path
    frame2: Path
    flow: Path


def frame_name(number: int, suffix: str) -> str:
    return f"frame_{number:04d}{suffix}"


def sintel_pairs(pass_dir: Path, flow_dir: Path) -> list[SintelPair]:
    pass_dir, flow_dir = Path(pass_dir), Path(flow_dir)
    if not pass_dir.is_dir():
        raise SintelLayoutError(f"{pass_dir}: not a directory (expected <scene>/frame_%04d.png below it)")
    pairs: list[SintelPair] = []
    for scene in sorted(p.name for p in pass_dir.iterdir() if p.is_dir()):
        count = len(list((pass_dir / scene).glob("*.png")))
        for number in range(1, count):
            pair = SintelPair(
                len(pairs), scene, pass_dir / scene / frame_name(number, ".png"),
                pass_dir / scene / frame_name(number + 1, ".png"), flow_dir / scene / frame_name(number, ".flo"),
            )
            missing = [str(p) for p in (pair.frame1, pair.frame2, pair.flow) if not p.is_file()]
            if missing:
                raise SintelLayoutError(f"{pass_dir / scene}: {count} frames, but {', '.join(missing)} not found")
            pairs.append(pair)
    if not pairs:
        raise SintelLayoutError(f"{pass_dir}: no scene with two or more frame_%04d.png files")
    return pairs


def read_frame(path: Path) -> np.ndarray:
    """(3, H, W) float32 RGB 0..255, as the network takes it (no scaling, no mean/std).

    Through the suite's image reader, which also catches a truncated PNG that OpenCV would
    decode partly without a word."""
    try:
        image = read_image(path)
    except (ImageReadError, FileNotFoundError) as exc:
        raise SintelLayoutError(str(exc)) from exc
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).astype(np.float32)


def write_frame(path: Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 RGB to a PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cv2 could not write the image")
