"""Top-down COCO keypoint processing: GT-box samples, crops, flip fusion, DARK decoding, OKS-NMS.

Model-agnostic: a model plugs in through ``TopDownConfig`` (input and heatmap sizes, thresholds).
The conventions are those of the HRNet-family "unbiased" top-down evaluation as spec 003
(TransPose) section d/e describes them: centre with the (w-1) convention, size-minus-one
affine, no flip shift, DARK with a Gaussian pre-blur, per-image rescoring and OKS-NMS.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from scipy.ndimage import correlate1d

from tooling.coco.keypoints import (
    FLIP_PAIRS,
    NUM_KEYPOINTS,
    OKS_SIGMAS,
    PERSON_CATEGORY_ID,
    flip_permutation,
)
from tooling.coco.transforms import (
    PIXEL_STD,
    affine_transform_points,
    get_affine_transform,
    normalize_rgb,
    warp_crop,
)

# Smallest heatmap value fed to the logarithm in the DARK Taylor step.
_LOG_FLOOR = 1e-10
# Guards the OKS denominator against two zero-area boxes.
_OKS_AREA_EPS = np.spacing(1.0)


@dataclass(frozen=True)
class TopDownConfig:
    """Geometry and thresholds of a top-down keypoint model. Sizes are (width, height)."""

    input_size: tuple[int, int] = (192, 256)
    heatmap_size: tuple[int, int] = (48, 64)
    num_joints: int = NUM_KEYPOINTS
    flip_pairs: tuple[tuple[int, int], ...] = FLIP_PAIRS
    box_padding: float = 1.25
    pixel_std: float = PIXEL_STD
    blur_kernel: int = 11
    visibility_threshold: float = 0.2
    oks_nms_threshold: float = 0.9
    oks_sigmas: tuple[float, ...] = tuple(OKS_SIGMAS.tolist())

    @property
    def aspect_ratio(self) -> float:
        return self.input_size[0] / self.input_size[1]


@dataclass(frozen=True, eq=False)
class TopDownSample:
    """One person crop to run: where it comes from and the box it is cropped with."""

    image_id: int
    file_name: str
    annotation_id: int
    center: np.ndarray  # float32 [2], image px
    scale: np.ndarray  # float32 [2], box size / pixel_std, padded and aspect-fixed
    area: float  # of the padded, aspect-fixed box: the object scale OKS-NMS uses
    box_score: float
    gt_keypoints: np.ndarray  # float64 [K, 3] (x, y, v) from the annotation


def padded_box_area(scale: np.ndarray, pixel_std: float = PIXEL_STD) -> float:
    """Area in px of a box given by its scale; float32 products, as the reference stores it."""
    return float(np.prod(np.asarray(scale, dtype=np.float32) * np.float32(pixel_std)))


def clean_box(bbox: Sequence[float], image_width: int, image_height: int
              ) -> tuple[float, float, float, float] | None:
    """Clip an [x, y, w, h] box to the image (inclusive pixel extents); None if nothing is left."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(image_width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(image_height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0)


def box_to_center_scale(box: Sequence[float], config: TopDownConfig
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Centre (w-1 convention) and padded scale of an [x, y, w, h] box, widened to the aspect."""
    x, y, w, h = box
    center = np.array([x + (w - 1.0) * 0.5, y + (h - 1.0) * 0.5], dtype=np.float32)
    if w > config.aspect_ratio * h:
        h = w / config.aspect_ratio
    elif w < config.aspect_ratio * h:
        w = h * config.aspect_ratio
    scale = np.array([w / config.pixel_std, h / config.pixel_std], dtype=np.float32)
    return center, scale * np.float32(config.box_padding)


def _annotation_sample(coco: COCO, annotation: dict[str, Any], config: TopDownConfig
                       ) -> TopDownSample | None:
    image = coco.imgs[annotation["image_id"]]
    if annotation["category_id"] != PERSON_CATEGORY_ID or annotation["area"] <= 0:
        return None
    keypoints = np.asarray(annotation["keypoints"], dtype=np.float64).reshape(-1, 3)
    if keypoints.max(initial=0.0) == 0:
        return None
    box = clean_box(annotation["bbox"], image["width"], image["height"])
    if box is None:
        return None
    center, scale = box_to_center_scale(box, config)
    return TopDownSample(image_id=image["id"], file_name=image["file_name"],
                         annotation_id=annotation["id"], center=center, scale=scale,
                         area=padded_box_area(scale, config.pixel_std), box_score=1.0,
                         gt_keypoints=keypoints)


def build_topdown_samples(coco: COCO, config: TopDownConfig,
                          image_ids: Iterable[int] | None = None) -> list[TopDownSample]:
    """GT-box samples: non-crowd persons with a usable box and at least one labelled joint.

    Order: images in annotation-file order (or ``image_ids`` order), then annotations in file
    order. Every sample gets box score 1.
    """
    samples = []
    for image_id in coco.getImgIds() if image_ids is None else image_ids:
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            sample = _annotation_sample(coco, annotation, config)
            if sample is not None:
                samples.append(sample)
    return samples


def crop_matrix(sample: TopDownSample, config: TopDownConfig) -> np.ndarray:
    return get_affine_transform(sample.center, sample.scale, config.input_size, size_minus_one=True,
                                pixel_std=config.pixel_std)


def preprocess_sample(image_rgb: np.ndarray, sample: TopDownSample, config: TopDownConfig
                      ) -> np.ndarray:
    """Network input [3, H, W] float32 for one person from its RGB uint8 image."""
    crop = warp_crop(image_rgb, crop_matrix(sample, config), config.input_size)
    return normalize_rgb(crop)


def flip_back(heatmaps_flipped: np.ndarray, flip_pairs: tuple[tuple[int, int], ...] = FLIP_PAIRS
              ) -> np.ndarray:
    """Heatmaps [N, K, H, W] of mirrored inputs, mirrored back with left/right joints swapped."""
    permutation = flip_permutation(heatmaps_flipped.shape[1], flip_pairs)
    return np.ascontiguousarray(heatmaps_flipped[:, permutation, :, ::-1])


def fuse_flip(heatmaps: np.ndarray, heatmaps_flipped: np.ndarray,
              flip_pairs: tuple[tuple[int, int], ...] = FLIP_PAIRS) -> np.ndarray:
    """Average of the plain and flipped-back heatmaps (no one-pixel shift)."""
    return (heatmaps + flip_back(heatmaps_flipped, flip_pairs)) * np.float32(0.5)


def argmax_coords(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer peak (x, y) [N, K, 2] float32 and peak value [N, K, 1]; (0, 0) where peak <= 0."""
    batch, joints, _, width = heatmaps.shape
    flat = heatmaps.reshape(batch, joints, -1)
    index = flat.argmax(axis=2)
    maxvals = flat.max(axis=2)[..., None]
    coords = np.stack((index % width, index // width), axis=-1).astype(np.float32)
    return coords * (maxvals > 0), maxvals


def _gaussian_taps(kernel_size: int) -> np.ndarray:
    """Normalised 1-D Gaussian with OpenCV's default sigma for this kernel size."""
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8
    offsets = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) * 0.5
    taps = np.exp(-(offsets ** 2) / (2.0 * sigma ** 2))
    return taps / taps.sum()


def blur_heatmaps(heatmaps: np.ndarray, kernel_size: int) -> np.ndarray:
    """Zero-border Gaussian blur per map, rescaled so each map keeps its original maximum.

    Computed in float64 and returned as float32, as the reference does.
    """
    taps = _gaussian_taps(kernel_size)
    maps = heatmaps.astype(np.float64)
    blurred = correlate1d(maps, taps, axis=-1, mode="constant", cval=0.0)
    blurred = correlate1d(blurred, taps, axis=-2, mode="constant", cval=0.0)
    original_max = maps.max(axis=(-2, -1), keepdims=True)
    blurred_max = blurred.max(axis=(-2, -1), keepdims=True)
    # An all-zero map has 0/0 here; its peak is masked to (0, 0) and never refined, so the NaN
    # it leaves behind is never read.
    with np.errstate(divide="ignore", invalid="ignore"):
        blurred *= original_max / blurred_max
    return blurred.astype(np.float32)


def dark_refine(coords: np.ndarray, blurred: np.ndarray) -> np.ndarray:
    """One Newton step on the log-heatmap around each integer peak (DARK), float32.

    Only peaks at least two pixels inside the map (strictly) are refined, so the second-order
    differences stay in bounds; a singular Hessian leaves the peak where it is.
    """
    _, _, height, width = blurred.shape
    log_maps = np.log(np.maximum(blurred, np.float32(_LOG_FLOOR)))
    refined = coords.copy()
    px = coords[..., 0].astype(np.int64)
    py = coords[..., 1].astype(np.int64)
    inside = (px > 1) & (px < width - 2) & (py > 1) & (py < height - 2)
    n_idx, k_idx = np.nonzero(inside)
    if n_idx.size == 0:
        return refined
    x, y = px[inside], py[inside]

    def at(dy: int, dx: int) -> np.ndarray:
        return log_maps[n_idx, k_idx, y + dy, x + dx]

    dx = np.float32(0.5) * (at(0, 1) - at(0, -1))
    dy = np.float32(0.5) * (at(1, 0) - at(-1, 0))
    dxx = np.float32(0.25) * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
    dyy = np.float32(0.25) * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
    dxy = np.float32(0.25) * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
    det = dxx * dyy - dxy * dxy
    solvable = det != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        step_x = (dyy * dx - dxy * dy) / det
        step_y = (dxx * dy - dxy * dx) / det
    refined[n_idx, k_idx, 0] -= np.where(solvable, step_x, 0).astype(np.float32)
    refined[n_idx, k_idx, 1] -= np.where(solvable, step_y, 0).astype(np.float32)
    return refined


def heatmap_to_image(coords: np.ndarray, centers: np.ndarray, scales: np.ndarray,
                     config: TopDownConfig) -> np.ndarray:
    """Heatmap-pixel coordinates [N, K, 2] to image pixels, per sample box."""
    preds = np.empty(coords.shape, dtype=np.float32)
    for i, (center, scale) in enumerate(zip(centers, scales)):
        inverse = get_affine_transform(center, scale, config.heatmap_size, size_minus_one=True,
                                       inverse=True, pixel_std=config.pixel_std)
        preds[i] = affine_transform_points(coords[i], inverse)
    return preds


@dataclass(frozen=True, eq=False)
class DecodedHeatmaps:
    """Every intermediate of ``decode_heatmaps``, for parity checks against reference dumps."""

    coords_argmax: np.ndarray  # [N, K, 2] heatmap px
    coords_refined: np.ndarray  # [N, K, 2] heatmap px after DARK
    preds: np.ndarray  # [N, K, 2] image px
    maxvals: np.ndarray  # [N, K, 1] joint scores


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray,
                    config: TopDownConfig) -> DecodedHeatmaps:
    """DARK decoding: argmax, blurred log-Taylor refinement, back to image pixels.

    The joint score is the raw peak of the input maps, taken before blurring.
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    coords, maxvals = argmax_coords(heatmaps)
    refined = dark_refine(coords, blur_heatmaps(heatmaps, config.blur_kernel))
    preds = heatmap_to_image(refined, np.asarray(centers), np.asarray(scales), config)
    return DecodedHeatmaps(coords, refined, preds, maxvals)


def rescore(maxvals: np.ndarray, box_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Person score = mean of joint scores above ``threshold`` (0 if none) times the box score."""
    joint_scores = maxvals.reshape(len(maxvals), -1)
    confident = joint_scores > threshold
    counts = confident.sum(axis=1)
    sums = np.where(confident, joint_scores, 0).sum(axis=1)
    keypoint_score = np.divide(sums, counts, out=np.zeros(len(sums), dtype=np.float64),
                               where=counts > 0)
    return keypoint_score * np.asarray(box_scores, dtype=np.float64)


def oks_to_others(reference: np.ndarray, others: np.ndarray, reference_area: float,
                  other_areas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """OKS of one pose [K, 2+] against poses [M, K, 2+], over all joints, mean area as the scale."""
    variances = (2.0 * sigmas) ** 2
    squared = ((others[..., :2] - reference[None, :, :2]) ** 2).sum(axis=-1)
    mean_area = (reference_area + other_areas)[:, None] / 2.0 + _OKS_AREA_EPS
    return np.exp(-squared / variances[None, :] / mean_area / 2.0).mean(axis=1)


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, threshold: float,
            sigmas: np.ndarray = OKS_SIGMAS) -> list[int]:
    """Greedy OKS-NMS; returns kept indices in descending score order.

    Ties keep their input order (the reference's order for ties is sort-implementation defined).
    """
    order = list(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"))
    keep: list[int] = []
    while order:
        best, rest = order[0], np.asarray(order[1:], dtype=np.int64)
        keep.append(int(best))
        if rest.size == 0:
            break
        overlap = oks_to_others(keypoints[best], keypoints[rest], float(areas[best]), areas[rest],
                                sigmas)
        order = list(rest[overlap <= threshold])
    return keep


@dataclass(frozen=True, eq=False)
class PersonPredictions:
    """Decoded poses of a list of samples, aligned with it."""

    image_ids: np.ndarray  # int64 [N]
    keypoints: np.ndarray  # float32 [N, K, 3] (x, y, score) in image px
    areas: np.ndarray  # float64 [N]
    box_scores: np.ndarray  # float64 [N]

    @classmethod
    def from_samples(cls, samples: Sequence[TopDownSample], preds: np.ndarray,
                     maxvals: np.ndarray) -> "PersonPredictions":
        keypoints = np.concatenate((preds, maxvals), axis=2).astype(np.float32)
        return cls(image_ids=np.array([s.image_id for s in samples], dtype=np.int64),
                   keypoints=keypoints,
                   areas=np.array([s.area for s in samples], dtype=np.float64),
                   box_scores=np.array([s.box_score for s in samples], dtype=np.float64))


def keypoint_results(persons: PersonPredictions, config: TopDownConfig) -> list[dict[str, Any]]:
    """COCO results entries after per-image rescoring and OKS-NMS.

    Images come in first-seen order, persons within an image in descending score order.
    """
    scores = rescore(persons.keypoints[..., 2], persons.box_scores, config.visibility_threshold)
    results = []
    for image_id in dict.fromkeys(persons.image_ids.tolist()):
        members = np.flatnonzero(persons.image_ids == image_id)
        kept = oks_nms(persons.keypoints[members], scores[members], persons.areas[members],
                       config.oks_nms_threshold, np.asarray(config.oks_sigmas))
        for index in members[kept]:
            results.append({
                "image_id": int(image_id),
                "category_id": PERSON_CATEGORY_ID,
                "keypoints": [float(v) for v in persons.keypoints[index].reshape(-1)],
                "score": float(scores[index]),
            })
    return results
