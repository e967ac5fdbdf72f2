"""COCO person-keypoint annotations and images, read with the checks a conformance run needs.

pycocotools is used for indexing and evaluation, but it reports a broken annotation file with a
bare ``assert`` or a ``KeyError`` deep inside COCOeval. ``load_coco`` validates the fields the
keypoint pipelines rely on up front and names the file and the offending entry instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools.coco import COCO

DEFAULT_SPLIT = "val2017"
_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "keypoints",
                      "num_keypoints")


class CocoFormatError(ValueError):
    """The annotation file is missing, unreadable, or lacks fields the pipeline needs."""


class ImageReadError(OSError):
    """An image file exists but is truncated or cannot be decoded."""


# Where a complete file of each container ends. OpenCV decodes a truncated JPEG or PNG partly (the
# rest grey) with only a libjpeg warning, so a cut file would be scored as if it were the image.
_COMPLETE_ENDINGS = {
    b"\xff\xd8": (b"\xff\xd9", "JPEG end-of-image marker"),
    b"\x89PNG": (b"IEND\xaeB`\x82", "PNG IEND chunk"),
}


def _check_complete(data: bytes, path: Path) -> None:
    for magic, (ending, what) in _COMPLETE_ENDINGS.items():
        if data.startswith(magic) and not data.rstrip(b"\0\r\n ").endswith(ending):
            raise ImageReadError(f"{path}: truncated image (no {what} at the end of its {len(data)} bytes)")


def _finite_numbers(values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _require_list(dataset: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = dataset.get(key)
    if not isinstance(value, list):
        found = "missing" if value is None else type(value).__name__
        raise CocoFormatError(f"{path}: top-level '{key}' must be a list, found {found}")
    return value


def _require_fields(entry: Any, fields: tuple[str, ...], what: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{path}: {what} is a {type(entry).__name__}, expected an object")
    missing = [field for field in fields if field not in entry]
    if missing:
        raise CocoFormatError(f"{path}: {what} lacks field(s) {', '.join(missing)}")


def _validate_annotation(annotation: dict[str, Any], what: str, image_ids: set[Any],
                         path: Path) -> None:
    if annotation["image_id"] not in image_ids:
        raise CocoFormatError(f"{path}: {what} refers to image_id {annotation['image_id']!r}, "
                              "which is not in 'images'")
    bbox = annotation["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and _finite_numbers(bbox)):
        raise CocoFormatError(f"{path}: {what} has bbox {bbox!r}, expected [x, y, w, h] finite numbers")
    keypoints = annotation["keypoints"]
    if not (isinstance(keypoints, list) and len(keypoints) % 3 == 0):
        raise CocoFormatError(f"{path}: {what} has a keypoints list whose length is not a "
                              "multiple of 3 (x, y, v triplets)")
    if not _finite_numbers(keypoints):
        raise CocoFormatError(f"{path}: {what} has keypoints that are not finite numbers (NaN, Inf or text)")
    if not _finite_numbers([annotation["area"]]):
        raise CocoFormatError(f"{path}: {what} has area {annotation['area']!r}, expected a finite number")


def _validate_keypoint_dataset(dataset: Any, path: Path) -> None:
    if not isinstance(dataset, dict):
        raise CocoFormatError(f"{path}: top level is a {type(dataset).__name__}, expected an "
                              "object with 'images', 'annotations' and 'categories'")
    images = _require_list(dataset, "images", path)
    annotations = _require_list(dataset, "annotations", path)
    _require_list(dataset, "categories", path)
    for index, image in enumerate(images):
        _require_fields(image, _IMAGE_FIELDS, f"images[{index}]", path)
    image_ids = {image["id"] for image in images}
    for index, annotation in enumerate(annotations):
        what = f"annotations[{index}]"
        _require_fields(annotation, _ANNOTATION_FIELDS, what, path)
        _validate_annotation(annotation, f"{what} (id {annotation['id']})", image_ids, path)


def load_coco(annotation_path: str | Path) -> COCO:
    """Parse and validate a COCO person-keypoints json; returns an indexed pycocotools COCO."""
    path = Path(annotation_path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: annotation file not found")
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise CocoFormatError(f"{path}: not UTF-8 text ({error})") from error
    _validate_keypoint_dataset(dataset, path)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_image(image_path: str | Path) -> np.ndarray:
    """BGR uint8 HxWx3, ignoring EXIF orientation as the reference pipelines do."""
    path = Path(image_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    data = path.read_bytes()
    if not data:
        raise ImageReadError(f"{path}: image file is empty")
    _check_complete(data, path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageReadError(f"{path}: OpenCV could not decode the image (corrupt or not an image)")
    return image


def read_image_rgb(image_path: str | Path) -> np.ndarray:
    """RGB uint8 HxWx3 (the colour order the COCO keypoint models are trained on)."""
    return cv2.cvtColor(read_image(image_path), cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class CocoKeypointDataset:
    """An annotation file, its parsed index and the folder holding its images."""

    annotation_path: Path
    image_dir: Path
    coco: COCO

    @classmethod
    def open(cls, annotation_path: str | Path, image_dir: str | Path) -> "CocoKeypointDataset":
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: image folder not found")
        return cls(Path(annotation_path), image_dir, load_coco(annotation_path))

    @classmethod
    def from_root(cls, root: str | Path, split: str = DEFAULT_SPLIT) -> "CocoKeypointDataset":
        """The seed layout: ``annotations/person_keypoints_<split>.json``, ``images/<split>/``."""
        paths = coco_layout(root, split)
        return cls.open(*paths)

    def image_ids(self) -> list[int]:
        """Image ids in annotation-file order (pycocotools ``getImgIds``)."""
        return list(self.coco.getImgIds())

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]


def coco_layout(root: str | Path, split: str = DEFAULT_SPLIT) -> tuple[Path, Path]:
    """(annotation file, image folder) of a COCO root laid out as the seed READMEs describe."""
    root = Path(root)
    return (root / "annotations" / f"person_keypoints_{split}.json", root / "images" / split)
