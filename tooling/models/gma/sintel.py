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

from tooling.coco.dataset import ImageReadError, image_size, read_image
from tooling.models.gma.flo import FloError, flo_size
from tooling.validation import Problems, tolerated

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
    check_sintel_claims(pairs, pass_dir, flow_dir)
    return pairs


def check_sintel_claims(pairs: list[SintelPair], pass_dir: Path, flow_dir: Path) -> None:
    """What the scoring assumes of each scene, from file headers only: as many flows as frame
    pairs (upstream's loader lists frames and flows separately and zips them in order, so an extra
    flow in one scene shifts every later scene's ground truth silently), every frame of a scene at
    one size, and each flow at its frames' size."""
    problems = Problems(pass_dir)
    scenes: dict[str, list[SintelPair]] = {}
    for pair in pairs:
        scenes.setdefault(pair.scene, []).append(pair)
    for scene, scene_pairs in scenes.items():
        flows = len(list((flow_dir / scene).glob("*.flo")))
        if flows != len(scene_pairs):
            problems.add(f"scene {scene}", f"has {len(scene_pairs) + 1} frames but {flows} flows in "
                         f"{flow_dir / scene}, expected {len(scene_pairs)} (one per consecutive pair)")
        sizes: dict[tuple[int, int], str] = {}
        for pair in scene_pairs:
            for frame in (pair.frame1, pair.frame2):
                try:
                    sizes.setdefault(image_size(frame), frame.name)
                except ImageReadError as exc:
                    raise SintelLayoutError(str(exc)) from exc
            if len(sizes) > 1:
                listed = ", ".join(f"{name} is {w} x {h}" for (w, h), name in sizes.items())
                problems.add(f"scene {scene}", f"mixes frame sizes ({listed})")
                break
            try:
                flow_size = flo_size(pair.flow)
            except FloError as exc:
                problems.add(f"scene {scene} / {pair.flow.name}", f"is not a readable flow ({exc})")
                continue
            frame_size = next(iter(sizes))
            if flow_size != frame_size:
                problems.add(f"scene {scene} / {pair.flow.name}", f"is a {flow_size[0]} x {flow_size[1]} flow for "
                             f"{frame_size[0]} x {frame_size[1]} frames")
    problems.raise_as(SintelLayoutError)
    unused = sorted({p.name for p in flow_dir.iterdir() if p.is_dir()} - set(scenes)) if flow_dir.is_dir() else []
    if unused:
        tolerated(f"{flow_dir}: flows of {len(unused)} scene(s) without frames in {pass_dir.name} "
                  f"({', '.join(unused[:5])}): not scored, as upstream walks the frame folders")


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
