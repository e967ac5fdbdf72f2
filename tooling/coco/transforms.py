"""Crop geometry and input normalisation shared by the COCO keypoint pipelines.

Boxes are described by a centre and a ``scale`` in units of ``pixel_std`` (200 px), as in the
HRNet family of codebases. The crop matrix is solved by OpenCV from three float32 point pairs
rather than written in closed form: ``cv2.warpAffine`` rounds the matrix to fixed point, and
the reference pipelines fed it the solved matrix, so the solve is what keeps crops bit-exact.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

PIXEL_STD = 200.0
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _perpendicular_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A third point that makes (a, b, c) a right angle at b, so the three pairs fix an affine."""
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def get_affine_transform(
    center: Sequence[float] | np.ndarray,
    scale: Sequence[float] | np.ndarray,
    output_size: tuple[int, int],
    *,
    size_minus_one: bool,
    inverse: bool = False,
    pixel_std: float = PIXEL_STD,
) -> np.ndarray:
    """2x3 float64 matrix mapping the box (centre, scale) onto an output of (width, height).

    Only ``scale[0]`` sets the zoom: the box width ``pixel_std*scale[0]`` spans the output width.
    ``size_minus_one`` selects the pixel convention. True (TransPose, HRNet top-down with the
    unbiased data processing): widths are measured between the first and last pixel centres,
    ``k = (W_out - 1) / (src_w - 1)`` and the centre lands on ``((W_out-1)/2, (H_out-1)/2)``.
    False (the classic one, used by bottom-up DEKR): ``k = W_out / src_w``, centre on
    ``(W_out/2, H_out/2)``. ``inverse`` returns the output-to-image map instead.
    """
    out_w, out_h = output_size
    src_w = float(scale[0]) * pixel_std
    offset = 1.0 if size_minus_one else 0.0
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = np.asarray(center, dtype=np.float32)
    src[1] = src[0] + np.array([0.0, (src_w - offset) * -0.5], dtype=np.float32)
    dst[0] = np.array([(out_w - offset) * 0.5, (out_h - offset) * 0.5], dtype=np.float32)
    dst[1] = dst[0] + np.array([0.0, (out_w - offset) * -0.5], dtype=np.float32)
    src[2] = _perpendicular_point(src[0], src[1])
    dst[2] = _perpendicular_point(dst[0], dst[1])
    if inverse:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def affine_transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to points [..., 2]; returns float64 [..., 2]."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_crop(image: np.ndarray, matrix: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """Bilinear crop with a black (0) constant border, same dtype as ``image``."""
    return cv2.warpAffine(image, matrix, output_size, flags=cv2.INTER_LINEAR)


def normalize_rgb(images_rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 [..., 3, H, W] scaled to [0, 1], ImageNet-normalised.

    Done in float32 step by step (divide by 255, subtract the mean, divide by the std) so the
    values are bit-identical to the ToTensor + Normalize pair the references use.
    """
    scaled = images_rgb.astype(np.float32) / np.float32(255.0)
    normalised = (scaled - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB
    return np.ascontiguousarray(np.moveaxis(normalised, -1, -3))


def flip_width(batch: np.ndarray) -> np.ndarray:
    """Mirror along the last (width) axis, returned contiguous for the inference backends."""
    return np.ascontiguousarray(batch[..., ::-1])
