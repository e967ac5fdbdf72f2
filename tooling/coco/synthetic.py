"""Small deterministic COCO-format keypoint datasets on disk, and a known-answer heatmap oracle.

``write_synthetic_coco`` draws stick figures on smooth noise and writes them in the val2017
layout (``annotations/person_keypoints_<split>.json``, ``images/<split>/<12-digit id>.jpg``), with
the awkward cases a real annotation file has: a box running off the image, a crowd person, a
person without keypoints and an image without people. Any top-down or bottom-up pipeline can
run on it end to end.

``GroundTruthHeatmapOracle`` stands in for a top-down network. It answers each crop with
Gaussians at that person's ground-truth joints, so the whole pipeline around it (crops, flip
fusion, decoding, back-projection, NMS, results json, COCOeval) must give AP 1.0, or the exact
value ``perfect_precision_ap`` predicts when some persons are deliberately missed.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from tooling.coco.dataset import DEFAULT_SPLIT, CocoKeypointDataset, coco_layout, read_image_rgb
from tooling.coco.keypoints import (
    KEYPOINT_NAMES,
    NUM_KEYPOINTS,
    PERSON_CATEGORY_ID,
    flip_permutation,
)
from tooling.coco.topdown import TopDownConfig, TopDownSample, preprocess_sample
from tooling.slice import KnownAnswer
from tooling.coco.transforms import affine_transform_points, flip_width, get_affine_transform

# Limbs as 0-based joint pairs, for drawing and for the json's (1-based) skeleton.
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
# A frontal standing pose in box-relative (u, v) coordinates; the person's left is image right.
_POSE_TEMPLATE = np.array([
    (0.50, 0.08), (0.54, 0.06), (0.46, 0.06), (0.58, 0.08), (0.42, 0.08),
    (0.66, 0.22), (0.34, 0.22), (0.76, 0.38), (0.24, 0.38), (0.80, 0.52), (0.20, 0.52),
    (0.60, 0.55), (0.40, 0.55), (0.62, 0.75), (0.38, 0.75), (0.63, 0.94), (0.37, 0.94),
], dtype=np.float64)
_POSE_JITTER = 0.03
_VISIBILITY_CHOICES = (2, 1, 0)
_VISIBILITY_PROBABILITIES = (0.7, 0.15, 0.15)
# Segmentation area relative to the box, roughly what a person fills of its box.
_AREA_FILL = 0.6
_OFF_IMAGE_OVERHANG_PX = 8.0
_JPEG_QUALITY = 95
# COCOeval's recall thresholds, 0:0.01:1.
_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def _person(rng: np.random.Generator, slot_x: float, slot_width: float, image_height: int
            ) -> tuple[list[float], np.ndarray]:
    """A random box inside the slot and its 17 (x, y, v) joints, unlabelled ones zeroed."""
    height = rng.uniform(0.45, 0.9) * image_height
    width = min(height * rng.uniform(0.4, 0.6), 0.9 * slot_width)
    x = slot_x + rng.uniform(0.0, slot_width - width)
    y = rng.uniform(0.0, image_height - height)
    relative = _POSE_TEMPLATE + rng.uniform(-_POSE_JITTER, _POSE_JITTER, _POSE_TEMPLATE.shape)
    joints = np.column_stack((x + relative[:, 0] * width, y + relative[:, 1] * height,
                              rng.choice(_VISIBILITY_CHOICES, NUM_KEYPOINTS,
                                         p=_VISIBILITY_PROBABILITIES)))
    joints = np.round(joints, 2)
    joints[joints[:, 2] == 0] = 0.0
    return [round(x, 2), round(y, 2), round(width, 2), round(height, 2)], joints


def _annotation(annotation_id: int, image_id: int, bbox: list[float], area: float,
                joints: np.ndarray) -> dict[str, Any]:
    keypoints: list[float | int] = []
    for x, y, visibility in joints:
        keypoints += [float(x), float(y), int(visibility)]
    return {
        "id": annotation_id, "image_id": image_id, "category_id": PERSON_CATEGORY_ID,
        "iscrowd": 0, "bbox": bbox, "area": area,
        "num_keypoints": int(np.count_nonzero(joints[:, 2])), "keypoints": keypoints,
    }


def _render(rng: np.random.Generator, size: tuple[int, int],
            people: Sequence[np.ndarray]) -> np.ndarray:
    """BGR image: smooth colour noise with each person drawn as a labelled-joint stick figure."""
    width, height = size
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for joints in people:
        colour = tuple(int(c) for c in rng.integers(64, 256, 3))
        labelled = joints[:, 2] > 0
        points = np.round(joints[:, :2]).astype(np.int32)
        for a, b in SKELETON:
            if labelled[a] and labelled[b]:
                cv2.line(image, tuple(points[a]), tuple(points[b]), colour, 3, cv2.LINE_AA)
        for point in points[labelled]:
            cv2.circle(image, tuple(point), 3, (255, 255, 255), -1, cv2.LINE_AA)
    return image


def _categories() -> list[dict[str, Any]]:
    return [{"id": PERSON_CATEGORY_ID, "name": "person", "supercategory": "person",
             "keypoints": list(KEYPOINT_NAMES),
             "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}]


def write_synthetic_coco(
    root: str | Path,
    *,
    seed: int = 0,
    num_images: int = 5,
    max_persons_per_image: int = 3,
    image_size: tuple[int, int] = (384, 256),
    split: str = DEFAULT_SPLIT,
) -> CocoKeypointDataset:
    """Write a synthetic person-keypoints dataset under ``root``; same seed, same files.

    Image ids are random and not sorted, so code that confuses ids with positions shows up.
    The first person's box runs off the left edge of the first image; the second and third
    images also hold a crowd person and a person without keypoints respectively; the last
    image has nobody. Every other person becomes a top-down sample.
    """
    if num_images < 4:
        raise ValueError(f"num_images must be at least 4 to hold every special case, "
                         f"got {num_images}")
    rng = np.random.default_rng(seed)
    annotation_path, image_dir = coco_layout(root, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_path.parent.mkdir(parents=True, exist_ok=True)
    width, height = image_size
    image_ids = [int(i) for i in rng.choice(np.arange(1, 600_000), num_images, replace=False)]
    images, annotations = [], []
    for index, image_id in enumerate(image_ids):
        file_name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        is_last = index == num_images - 1
        num_people = 0 if is_last else int(rng.integers(1, max_persons_per_image + 1))
        special = {1: "crowd", 2: "no_keypoints"}.get(index)
        slots = num_people + (special is not None)
        people = []
        for slot in range(slots):
            bbox, joints = _person(rng, slot * width / slots, width / slots, height)
            people.append(joints)
            area = round(bbox[2] * bbox[3] * _AREA_FILL, 2)
            if not annotations:
                # Stretch the first box past the left edge so the box cleaning has work to do.
                bbox = [-_OFF_IMAGE_OVERHANG_PX, bbox[1],
                        round(bbox[0] + bbox[2] + _OFF_IMAGE_OVERHANG_PX, 2), bbox[3]]
            annotation = _annotation(len(annotations) + 1, image_id, bbox, area, joints)
            if slot == num_people and special == "crowd":
                annotation["iscrowd"] = 1
            elif slot == num_people and special == "no_keypoints":
                annotation.update(num_keypoints=0, keypoints=[0] * (3 * NUM_KEYPOINTS))
            annotations.append(annotation)
        cv2.imwrite(str(image_dir / file_name), _render(rng, image_size, people),
                    [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    dataset = {"images": images, "annotations": annotations, "categories": _categories()}
    annotation_path.write_text(json.dumps(dataset), encoding="utf-8")
    return CocoKeypointDataset.open(annotation_path, image_dir)


def perfect_precision_ap(recall: float) -> float:
    """COCO AP when every detection above the cut is right and recall stops at ``recall``.

    Precision is 1 at each of the 101 recall thresholds up to ``recall`` and 0 beyond it.
    """
    gaps = np.abs(_RECALL_THRESHOLDS - recall)
    if gaps.min() < 1e-9:
        raise ValueError(f"recall {recall} sits on a COCO recall threshold; the AP would depend "
                         "on float rounding, pick another person count")
    return float(np.count_nonzero(_RECALL_THRESHOLDS <= recall)) / len(_RECALL_THRESHOLDS)


def _fingerprint(crop: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(crop, dtype=np.float32).tobytes(),
                           digest_size=16).digest()


class GroundTruthHeatmapOracle:
    """A perfect top-down "network" for the samples it was built with.

    It recognises each crop by a fingerprint of the exact input the pipeline feeds (or of its
    mirror image, for the flip-test pass), so it depends on neither call order nor batching.
    Its answer for a mirrored crop is the plain answer mirrored with left/right joints swapped,
    which is what an ideal network would output. All-zero rows (batch padding) get zero maps;
    any other unknown crop is an error, since it means the pipeline fed something unexpected.
    """

    def __init__(self, dataset: CocoKeypointDataset, samples: Sequence[TopDownSample],
                 config: TopDownConfig = TopDownConfig(), *, sigma: float = 2.0,
                 missed_annotation_ids: Collection[int] = ()) -> None:
        self._config = config
        self._sigma = sigma
        self._permutation = flip_permutation(config.num_joints, config.flip_pairs)
        self._answers: dict[bytes, np.ndarray] = {}
        images: dict[int, np.ndarray] = {}
        for sample in samples:
            if sample.image_id not in images:
                images[sample.image_id] = read_image_rgb(dataset.image_path(sample.image_id))
            crop = preprocess_sample(images[sample.image_id], sample, config)
            missed = sample.annotation_id in missed_annotation_ids
            answer = self._blank() if missed else self._render(sample)
            key = _fingerprint(crop)
            if key in self._answers and not np.array_equal(self._answers[key], answer):
                raise ValueError(f"annotation {sample.annotation_id}: its crop is identical to "
                                 "another person's, so the oracle cannot tell them apart")
            self._answers[key] = answer

    def _blank(self) -> np.ndarray:
        width, height = self._config.heatmap_size
        return np.zeros((self._config.num_joints, height, width), dtype=np.float32)

    def _render(self, sample: TopDownSample) -> np.ndarray:
        """Unit-peak Gaussians at the labelled GT joints, in this sample's heatmap frame."""
        width, height = self._config.heatmap_size
        to_heatmap = get_affine_transform(sample.center, sample.scale, (width, height),
                                          size_minus_one=True, pixel_std=self._config.pixel_std)
        joints = affine_transform_points(sample.gt_keypoints[:, :2], to_heatmap)
        grid_y, grid_x = np.mgrid[0:height, 0:width]
        maps = self._blank()
        for joint, (x, y) in enumerate(joints):
            if sample.gt_keypoints[joint, 2] > 0:
                squared = (grid_x - x) ** 2 + (grid_y - y) ** 2
                maps[joint] = np.exp(-squared / (2.0 * self._sigma ** 2))
        return maps

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return np.stack([self._answer(crop) for crop in inputs])

    def _answer(self, crop: np.ndarray) -> np.ndarray:
        plain = self._answers.get(_fingerprint(crop))
        if plain is not None:
            return plain
        mirrored = self._answers.get(_fingerprint(flip_width(crop)))
        if mirrored is not None:
            return np.ascontiguousarray(mirrored[self._permutation, :, ::-1])
        if not crop.any():
            return self._blank()
        raise ValueError("the oracle was given a crop it did not prepare; the pipeline's crops "
                         "differ from preprocess_sample() of the oracle's samples")


# Where the suite's staging layout puts val2017 below a data root (see README, "Stage data").
STAGED_ANNOTATIONS = "coco/annotations/person_keypoints_val2017.json"
STAGED_IMAGES = "coco/images/val2017"
PERFECT_SCORES = {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AR": 1.0}


def perfect_score_answer(root: Path, oracles: dict[str, Any], profile: str = "smoke") -> KnownAnswer:
    """The known answer of a set staged by ``stage_synthetic_coco`` and scored through ideal
    oracles: every COCO statistic that matters is exactly 1.0."""
    return KnownAnswer(root / "data", root / "weights", dict(PERFECT_SCORES), tolerance=1e-9,
                       profile=profile, oracles=oracles)


def stage_synthetic_coco(root: Path, model: str, checkpoints: dict[str, Any], *, seed: int,
                         num_images: int) -> CocoKeypointDataset:
    """A synthetic val2017 under ``root/data`` and the given state_dicts under ``root/weights/<model>``,
    laid out exactly as staged data is, so a known-answer run goes through the staged code path."""
    dataset = write_synthetic_coco(root / "data" / "coco", seed=seed, num_images=num_images)
    if (dataset.annotation_path, dataset.image_dir) != (root / "data" / STAGED_ANNOTATIONS, root / "data" / STAGED_IMAGES):
        raise AssertionError("the synthetic COCO layout no longer matches the staging layout")
    weights = root / "weights" / model
    weights.mkdir(parents=True)
    for file, state in checkpoints.items():
        torch.save(state, weights / file)
    return dataset
