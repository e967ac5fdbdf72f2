"""A small Sintel-format set whose ground truth is known exactly: real frames warped by affine maps.

Every frame k of a scene shows the source image through an affine map ``T_k`` (frame pixel p
shows source point ``A_k p + t_k``), rendered with bilinear sampling. The point seen at p in
frame k is seen at ``T_{k+1}^-1(T_k(p))`` in frame k+1, so the forward flow is that minus p:
exact by construction, out-of-frame motion included (Sintel's ground truth also covers it). The
clean pass renders frame_0047 of the real Sintel pair, the final pass frame_0048: different
pictures, the same motion, as in Sintel where both passes share the flow.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tooling.models.gma.flo import write_flo
from tooling.models.gma.sintel import DATA, PASSES, frame_name, write_frame

FRAME_HEIGHT, FRAME_WIDTH = 124, 128  # padded to 128 x 128, two rows each side as Sintel's 436 -> 440
SOURCES = {"clean": "frame_0047.png", "final": "frame_0048.png"}


@dataclass(frozen=True)
class Affine:
    """Frame pixel (x, y) -> source pixel ``matrix @ (x, y) + offset``."""

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def make(cls, centre: tuple[float, float], scale: float = 1.0, degrees: float = 0.0) -> "Affine":
        """A view of the source centred on ``centre``, zoomed by ``scale`` and rotated by ``degrees``."""
        angle = np.deg2rad(degrees)
        matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        frame_centre = np.array([(FRAME_WIDTH - 1) / 2, (FRAME_HEIGHT - 1) / 2])
        return cls(matrix, np.asarray(centre, np.float64) - matrix @ frame_centre)

    def to_source(self, points: np.ndarray) -> np.ndarray:
        return points @ self.matrix.T + self.offset

    def from_source(self, points: np.ndarray) -> np.ndarray:
        return (points - self.offset) @ np.linalg.inv(self.matrix).T

    def render(self, source: np.ndarray) -> np.ndarray:
        """The (FRAME_HEIGHT, FRAME_WIDTH, 3) uint8 view: dst(p) = bilinear source at to_source(p)."""
        forward = np.hstack([self.matrix, self.offset[:, None]])
        warped = cv2.warpAffine(source.astype(np.float32), forward, (FRAME_WIDTH, FRAME_HEIGHT),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
        return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


# Per scene, the views of its frames (source images are 436 x 1024): a pan with a zoom, a
# rotation about a drifting centre, and a two-frame scene with a larger jump.
SCENES: dict[str, list[Affine]] = {
    "pan_zoom": [Affine.make((400, 200)), Affine.make((405.5, 197.25), 1.03), Affine.make((412.0, 195.0), 1.06)],
    "rotate": [Affine.make((640, 230), 1.0, 0.0), Affine.make((637.0, 233.5), 1.0, 2.5),
               Affine.make((633.0, 236.0), 1.0, 5.0)],
    "jump": [Affine.make((300, 260), 1.1, -3.0), Affine.make((311.0, 252.0), 1.0, 0.0)],
}


def pixel_points() -> np.ndarray:
    """(H, W, 2) pixel coordinates (x, y) of a frame."""
    cols, rows = np.meshgrid(np.arange(FRAME_WIDTH, dtype=np.float64), np.arange(FRAME_HEIGHT, dtype=np.float64))
    return np.stack([cols, rows], axis=-1)


def flow_between(first: Affine, second: Affine) -> np.ndarray:
    """(H, W, 2) float32 forward flow from a frame viewed through ``first`` to one through ``second``."""
    points = pixel_points()
    return (second.from_source(first.to_source(points)) - points).astype(np.float32)


def write_warped_sintel(data_root: Path, frames_dir: Path) -> dict[str, list[np.ndarray]]:
    """Write the set below ``data_root`` in the staged layout; returns the flows per pass, pair order."""
    sources = {}
    for name, file in SOURCES.items():
        image = cv2.imread(str(frames_dir / file), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"{frames_dir / file}: the real Sintel frame the known answer warps is missing")
        sources[name] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    flows: list[np.ndarray] = []
    for scene, views in sorted(SCENES.items()):
        flow_dir = data_root / DATA["flow"] / scene
        flow_dir.mkdir(parents=True)
        for number, (first, second) in enumerate(zip(views, views[1:]), start=1):
            flow = flow_between(first, second)
            write_flo(flow_dir / frame_name(number, ".flo"), flow)
            flows.append(flow)
        for pass_name in PASSES:
            scene_dir = data_root / DATA[pass_name] / scene
            scene_dir.mkdir(parents=True)
            for number, view in enumerate(views, start=1):
                write_frame(scene_dir / frame_name(number, ".png"), view.render(sources[pass_name]))
    return {pass_name: flows for pass_name in PASSES}
