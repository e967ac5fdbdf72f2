"""TransPose-R-A3 evaluation settings on top of the shared COCO top-down stack (spec 003 d/e).

Everything generic lives in ``tooling.coco``; this module only pins the values of the seed's
yaml (TP_R_256x192_d256_h1024_enc3_mh8) so that callers cannot drift from them. Images are
keyed by their COCO image id, which for val2017 equals the reference's
``int(file_name[-16:-4])``.
"""
from __future__ import annotations

from pathlib import Path

from tooling.coco.dataset import CocoKeypointDataset
from tooling.coco.pipeline import BatchStore, ProgressCallback, RunBatch, TopDownEvaluation, evaluate_topdown
from tooling.coco.topdown import TopDownConfig

TRANSPOSE_R_TOPDOWN = TopDownConfig(
    input_size=(192, 256),  # MODEL.IMAGE_SIZE (w, h)
    heatmap_size=(48, 64),  # MODEL.HEATMAP_SIZE (w, h)
    box_padding=1.25,
    blur_kernel=11,  # TEST.BLUR_KERNEL for DARK
    visibility_threshold=0.2,  # TEST.IN_VIS_THRE
    oks_nms_threshold=0.9,  # TEST.OKS_THRE
)


def evaluate_transpose_r(dataset: CocoKeypointDataset, run_batch: RunBatch, *, batch_size: int,
                         limit: int | None = None, results_path: str | Path | None = None,
                         progress: ProgressCallback | None = None,
                         store: BatchStore | None = None) -> TopDownEvaluation:
    """GT-box, flip-test COCO keypoint evaluation of a TransPose-R backend (input -> output)."""
    return evaluate_topdown(dataset, run_batch, batch_size=batch_size, config=TRANSPOSE_R_TOPDOWN,
                            limit=limit, results_path=results_path, flip_test=True,
                            progress=progress, store=store)
