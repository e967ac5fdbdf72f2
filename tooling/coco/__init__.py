"""Model-agnostic COCO person-keypoint stack: data, crops, top-down decoding, evaluation, and
synthetic datasets with known answers. Submodules hold the details; the common names are here."""
from tooling.coco.dataset import (
    CocoFormatError,
    CocoKeypointDataset,
    ImageReadError,
    coco_layout,
    load_coco,
    read_image,
    read_image_rgb,
)
from tooling.coco.evaluation import (
    KEYPOINT_STAT_NAMES,
    evaluate_keypoints,
    first_image_ids,
    write_results_json,
)
from tooling.coco.keypoints import FLIP_PAIRS, KEYPOINT_NAMES, OKS_SIGMAS, flip_permutation
from tooling.coco.pipeline import (
    TopDownEvaluation,
    TopDownProgress,
    evaluate_topdown,
    predict_topdown,
)
from tooling.coco.synthetic import (
    GroundTruthHeatmapOracle,
    perfect_precision_ap,
    write_synthetic_coco,
)
from tooling.coco.topdown import TopDownConfig, TopDownSample, build_topdown_samples

__all__ = [
    "FLIP_PAIRS",
    "KEYPOINT_NAMES",
    "KEYPOINT_STAT_NAMES",
    "OKS_SIGMAS",
    "CocoFormatError",
    "CocoKeypointDataset",
    "GroundTruthHeatmapOracle",
    "ImageReadError",
    "TopDownConfig",
    "TopDownEvaluation",
    "TopDownProgress",
    "TopDownSample",
    "build_topdown_samples",
    "coco_layout",
    "evaluate_keypoints",
    "evaluate_topdown",
    "first_image_ids",
    "flip_permutation",
    "load_coco",
    "perfect_precision_ap",
    "predict_topdown",
    "read_image",
    "read_image_rgb",
    "write_results_json",
    "write_synthetic_coco",
]
