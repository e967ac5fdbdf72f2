"""Keypoint results files and COCOeval, with pycocotools' console chatter kept out of the logs."""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tooling.jsonio import strict_json, write_json

# Names of COCOeval.stats for iouType "keypoints", in its order.
KEYPOINT_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl",
)


def write_results_json(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write results atomically: a reader (or a killed run) never sees a half-written file.
    A non-finite value is refused: COCOeval would silently drop or mis-rank that detection."""
    cleaned, replaced = strict_json(list(results))
    if replaced:
        where = ", ".join(f"detection {p.split('.', 1)[0]} field {p.split('.', 1)[-1]} ({v})"
                          for p, v in list(replaced.items())[:5])
        raise ValueError(f"{path}: {len(replaced)} non-finite value(s) in the detections: {where}")
    return write_json(path, cleaned, indent=None)


def first_image_ids(coco: COCO, limit: int | None) -> list[int]:
    """The first ``limit`` image ids in annotation-file order (all of them for None)."""
    image_ids = list(coco.getImgIds())
    if limit is None:
        return image_ids
    if limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return image_ids[:limit]


def _load_results(coco_gt: COCO, results_path: Path) -> COCO:
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{results_path}: results file not found") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{results_path}: not valid JSON ({error})") from error
    if not isinstance(results, list) or not results:
        raise ValueError(f"{results_path}: expected a non-empty list of detections; COCOeval "
                         "cannot score an empty result set")
    unknown = {r.get("image_id") for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"{results_path}: detections for image ids not in the ground truth: "
                         f"{sorted(unknown, key=str)[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(results)


def evaluate_keypoints(coco_gt: COCO, results_path: str | Path,
                       image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """COCOeval 'keypoints' stats by name; ``image_ids`` restricts the evaluation to a subset."""
    coco_dt = _load_results(coco_gt, Path(results_path))
    evaluator = COCOeval(coco_gt, coco_dt, "keypoints")
    evaluator.params.useSegm = None
    if image_ids is not None:
        evaluator.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(KEYPOINT_STAT_NAMES, evaluator.stats)}
