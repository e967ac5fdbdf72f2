"""Pictures of a disagreement between torch eager and a deployed backend, drawn with OpenCV from
arrays: the slices compose them (``ModelSlice.disagreement_picture``) from these pieces, the
agreement gate saves the one of its worst call, the history keeps it and the report shows it."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

TORCH_BGR = (60, 180, 60)  # green: torch eager
BACKEND_BGR = (40, 40, 230)  # red: the deployed backend
PANEL_HEIGHT = 256
TITLE_HEIGHT = 18


def as_image(array: np.ndarray) -> np.ndarray:
    """A CHW or HWC array (any range, 1 or 3 channels) as an HxWx3 uint8 BGR picture, stretched
    to its own range (network inputs are normalised; what matters is what a person recognises)."""
    image = np.asarray(array, np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 2:
        image = image[..., None]
    low, high = float(np.min(image)), float(np.max(image))
    image = (image - low) / (high - low) * 255.0 if high > low else np.zeros_like(image)
    image = image.clip(0, 255).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., ::-1])  # RGB -> BGR for OpenCV


def heat(values: np.ndarray, label: str = "") -> tuple[str, np.ndarray]:
    """A non-negative map (|difference|, EPE) in the inferno colour map, scaled to its maximum,
    which the title states."""
    values = np.asarray(values, np.float64)
    peak = float(values.max()) if values.size else 0.0
    scaled = (values / peak * 255.0 if peak > 0 else np.zeros_like(values)).astype(np.uint8)
    return f"{label} (max {peak:.2g})", cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)


def flow_colour(flow: np.ndarray, scale: float | None = None) -> np.ndarray:
    """A 2xHxW flow as the usual colour wheel: hue is the direction, brightness the magnitude
    (relative to ``scale``, default the field's largest, so two flows compare on one scale)."""
    u, v = np.asarray(flow[0], np.float32), np.asarray(flow[1], np.float32)
    magnitude, angle = cv2.cartToPolar(u, v)
    scale = scale or float(magnitude.max()) or 1.0
    hsv = np.zeros((*u.shape, 3), np.uint8)
    hsv[..., 0] = (angle * 90 / np.pi).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / scale * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def draw_points(image: np.ndarray, points: np.ndarray, colour: tuple[int, int, int], *,
                scale: float = 1.0, edges: Sequence[tuple[int, int]] = (), cross: bool = False,
                under: bool = False) -> np.ndarray:
    """Keypoints (N x 2, x then y, in the image's pixels before ``scale``) as dots, or crosses, and
    the skeleton ``edges`` between them; ``under`` draws them larger, so a set drawn on top of
    them leaves a visible rim where the two agree."""
    out = image.copy()
    pts = [(int(round(x * scale)), int(round(y * scale))) for x, y in np.asarray(points, np.float64)[:, :2]]
    for a, b in edges:
        cv2.line(out, pts[a], pts[b], colour, 3 if under else 1, cv2.LINE_AA)
    for p in pts:
        if cross:
            cv2.drawMarker(out, p, colour, cv2.MARKER_CROSS, 9, 2)
        else:
            cv2.circle(out, p, 5 if under else 3, colour, -1, cv2.LINE_AA)
    return out


def upscale(image: np.ndarray, height: int = PANEL_HEIGHT) -> tuple[np.ndarray, float]:
    """The picture at ``height`` rows (nearest neighbour: pixels stay pixels), and the factor."""
    factor = height / image.shape[0]
    width = max(1, int(round(image.shape[1] * factor)))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST), factor


def panel(tiles: Sequence[tuple[str, np.ndarray]], footer: str = "") -> np.ndarray:
    """Tiles side by side at one height, each under its title, with an optional footer line."""
    columns = []
    for title, tile in tiles:
        if tile.shape[0] != PANEL_HEIGHT:
            tile, _ = upscale(tile)
        columns.append(np.vstack([_caption(title, tile.shape[1], (0, 0, 0)), tile]))
        columns.append(np.full((PANEL_HEIGHT + TITLE_HEIGHT, 4, 3), 255, np.uint8))
    picture = np.hstack(columns[:-1])
    if footer:
        picture = np.vstack([picture, _caption(footer, picture.shape[1], (60, 60, 60))])
    return picture


def _caption(text: str, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    """A white bar holding ``text``, its font shrunk until the whole text fits the width."""
    bar = np.full((TITLE_HEIGHT, width, 3), 255, np.uint8)
    scale = 0.4
    while scale > 0.2 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 6:
        scale -= 0.02
    cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return bar


def keypoints_over(image_chw: np.ndarray, reference: np.ndarray, actual: np.ndarray, title: str,
                   edges: Sequence[tuple[int, int]] = ()) -> tuple[str, np.ndarray]:
    """Torch eager's keypoints (green dots) and the backend's (red crosses) over the input image."""
    picture, factor = upscale(as_image(image_chw))
    picture = draw_points(picture, reference, TORCH_BGR, scale=factor, edges=edges, under=True)
    picture = draw_points(picture, actual, BACKEND_BGR, scale=factor, edges=edges, cross=True)
    return title, picture


def png_bytes(picture: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", picture)
    if not ok:
        raise ValueError("could not encode the picture as PNG")
    return encoded.tobytes()
