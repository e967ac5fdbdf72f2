"""COCO person-keypoint annotations and images, read with the checks a conformance run needs.

pycocotools is used for indexing and evaluation, but it reports a broken annotation file with a
bare ``assert`` or a ``KeyError`` deep inside COCOeval. ``load_coco`` validates the fields the
keypoint pipelines rely on up front and names the file and the offending entry instead.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL.Image
from pycocotools.coco import COCO

from tooling.coco.keypoints import NUM_KEYPOINTS
from tooling.validation import Problems, is_finite_number, is_integer, tolerated

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


def _require_list(dataset: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = dataset.get(key)
    if not isinstance(value, list):
        found = "missing" if value is None else type(value).__name__
        raise CocoFormatError(f"{path}: top-level '{key}' must be a list, found {found}")
    return value


def _has_fields(entry: Any, fields: tuple[str, ...], what: str, problems: Problems) -> bool:
    if not isinstance(entry, dict):
        problems.add(what, f"is a {type(entry).__name__}, expected an object")
        return False
    missing = [field for field in fields if field not in entry]
    if missing:
        problems.add(what, f"lacks field(s) {', '.join(missing)}")
    return not missing


def _person_category(categories: list[Any], problems: Problems) -> Any:
    """The person category's id; COCOeval scores per category, so without it every AP is -1."""
    person = [c for c in categories if isinstance(c, dict) and c.get("name") == "person"]
    if not person:
        problems.add("categories", "hold no 'person' category: COCOeval would score no person (AP -1)")
        return None
    declared = person[0].get("keypoints")
    if isinstance(declared, list) and len(declared) != NUM_KEYPOINTS:
        problems.add("categories (person)", f"declare {len(declared)} keypoint names, expected {NUM_KEYPOINTS}")
    return person[0].get("id")


def _checked_images(images: list[Any], problems: Problems) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    position: dict[int, int] = {}
    for index, image in enumerate(images):
        what = f"images[{index}]"
        if not _has_fields(image, _IMAGE_FIELDS, what, problems):
            continue
        image_id = image["id"]
        record = f"{what} (id {image_id!r})"
        if not is_integer(image_id):
            problems.add(record, "has a non-integer id: results refer to images by integer id")
            continue
        if image_id in by_id:
            problems.add(record, f"repeats the id of images[{position[image_id]}]: pycocotools keeps only one of them")
            continue
        for side in ("width", "height"):
            if not (is_integer(image[side]) and image[side] > 0):
                problems.add(record, f"has {side} {image[side]!r}, expected a positive integer")
        if not (isinstance(image["file_name"], str) and image["file_name"]):
            problems.add(record, f"has file_name {image['file_name']!r}, expected a file name")
        by_id[image_id] = image
        position[image_id] = index
    return by_id


def _check_keypoints(annotation: dict[str, Any], record: str, problems: Problems) -> None:
    keypoints = annotation["keypoints"]
    if not (isinstance(keypoints, list) and len(keypoints) == 3 * NUM_KEYPOINTS):
        size = len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__
        problems.add(record, f"has keypoints of length {size}, expected {NUM_KEYPOINTS} (x, y, v) triplets "
                     f"= {3 * NUM_KEYPOINTS} numbers")
        return
    if not all(is_finite_number(v) for v in keypoints):
        problems.add(record, "has keypoints that are not finite numbers (NaN, Inf or text)")
        return
    visibility = keypoints[2::3]
    odd = sorted({v for v in visibility if v not in (0, 1, 2)})
    if odd:
        problems.add(record, f"has keypoint visibility {odd}, expected 0 (not labelled), 1 or 2")
    labelled = sum(1 for v in visibility if v > 0)
    if annotation["num_keypoints"] != labelled:
        problems.add(record, f"has num_keypoints {annotation['num_keypoints']!r} but {labelled} labelled keypoints: "
                     "COCOeval ignores a person whose num_keypoints is 0 and trusts the field")


def _check_box(annotation: dict[str, Any], image: dict[str, Any] | None, record: str,
               problems: Problems) -> bool:
    """False if the box is not a positive-size box; True otherwise. Overhang is noted by the caller."""
    bbox = annotation["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)):
        problems.add(record, f"has bbox {bbox!r}, expected [x, y, w, h] finite numbers")
        return False
    if bbox[2] <= 0 or bbox[3] <= 0:
        problems.add(record, f"has bbox {bbox!r} of size {bbox[2]} x {bbox[3]}, expected a positive width and height")
        return False
    area = annotation["area"]
    if not is_finite_number(area) or area <= 0:
        problems.add(record, f"has area {area!r}, expected a positive number (OKS divides by it)")
    return True


def _outside(bbox: list[float], image: dict[str, Any]) -> bool:
    x, y, w, h = bbox
    return x < 0 or y < 0 or x + w > image["width"] + 1 or y + h > image["height"] + 1


def _validate_keypoint_dataset(dataset: Any, path: Path) -> None:
    if not isinstance(dataset, dict):
        raise CocoFormatError(f"{path}: top level is a {type(dataset).__name__}, expected an "
                              "object with 'images', 'annotations' and 'categories'")
    images = _require_list(dataset, "images", path)
    annotations = _require_list(dataset, "annotations", path)
    categories = _require_list(dataset, "categories", path)
    problems = Problems(path)
    person_id = _person_category(categories, problems)
    by_id = _checked_images(images, problems)
    seen: dict[Any, int] = {}
    non_person = outside = 0
    for index, annotation in enumerate(annotations):
        what = f"annotations[{index}]"
        if not _has_fields(annotation, _ANNOTATION_FIELDS, what, problems):
            continue
        record = f"{what} (id {annotation['id']!r})"
        if not is_integer(annotation["id"]):
            problems.add(record, "has a non-integer id")
        elif annotation["id"] in seen:
            problems.add(record, f"repeats the id of annotations[{seen[annotation['id']]}]: "
                         "pycocotools keeps only one of them")
        else:
            seen[annotation["id"]] = index
        image = by_id.get(annotation["image_id"]) if is_integer(annotation["image_id"]) else None
        if image is None:
            problems.add(record, f"refers to image_id {annotation['image_id']!r}, which is not in 'images'")
        if person_id is not None and annotation["category_id"] != person_id:
            non_person += 1
            continue
        if annotation["iscrowd"] not in (0, 1):
            problems.add(record, f"has iscrowd {annotation['iscrowd']!r}, expected 0 or 1")
        _check_keypoints(annotation, record, problems)
        if _check_box(annotation, image, record, problems) and image is not None:
            outside += _outside(annotation["bbox"], image)
    problems.raise_as(CocoFormatError)
    if non_person:
        tolerated(f"{path}: {non_person} annotation(s) of another category than person: not used as "
                  "people, as upstream's keypoint loader skips them")
    if outside:
        tolerated(f"{path}: {outside} person box(es) reach outside their image: clipped to it (and "
                  "dropped if nothing is left), as upstream's keypoint loader does")


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


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def check_images_on_disk(coco: COCO, annotation_path: Path, image_dir: Path) -> None:
    """Every image the annotations list is in ``image_dir`` at the declared size (read from the
    file's header, not decoded): boxes and keypoints of a resized image would be scored in the
    wrong place. Images on disk that the annotations do not list are tolerated, as upstream does."""
    problems = Problems(image_dir)
    listed = set()
    for image_id, image in coco.imgs.items():
        listed.add(image["file_name"])
        path = image_dir / image["file_name"]
        record = f"{image['file_name']} (image id {image_id} of {annotation_path.name})"
        if not path.is_file():
            problems.add(record, "is missing: the annotations list it")
            continue
        try:
            size = image_size(path)
        except ImageReadError as exc:
            problems.add(record, f"is not a readable image ({exc})")
            continue
        if size != (image["width"], image["height"]):
            problems.add(record, f"is {size[0]} x {size[1]} pixels, but the annotations declare "
                         f"{image['width']} x {image['height']}: its people would be scored in the wrong place")
    problems.raise_as(CocoFormatError)
    extra = sum(1 for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.name not in listed)
    if extra:
        tolerated(f"{image_dir}: {extra} image file(s) not listed in {annotation_path.name}: not scored, "
                  "as upstream evaluates only the images its annotations list")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header, without decoding it (EXIF orientation
    ignored, as ``read_image`` ignores it)."""
    try:
        with PIL.Image.open(path) as opened:
            return opened.size
    except (OSError, PIL.UnidentifiedImageError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc


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
        coco = load_coco(annotation_path)
        check_images_on_disk(coco, Path(annotation_path), image_dir)
        return cls(Path(annotation_path), image_dir, coco)

    def image_ids(self) -> list[int]:
        """Image ids in annotation-file order (pycocotools ``getImgIds``)."""
        return list(self.coco.getImgIds())

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]


def coco_layout(root: str | Path, split: str = DEFAULT_SPLIT) -> tuple[Path, Path]:
    """(annotation file, image folder) of a COCO root laid out as the seed READMEs describe."""
    root = Path(root)
    return (root / "annotations" / f"person_keypoints_{split}.json", root / "images" / split)
