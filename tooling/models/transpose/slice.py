"""TransPose-R-A3 as the engine sees it: network, heatmap decoding, COCO accuracy, known answer."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from tooling.coco.dataset import CocoKeypointDataset, coco_layout
from tooling.coco.synthetic import GroundTruthHeatmapOracle, write_synthetic_coco
from tooling.coco.topdown import build_topdown_samples, decode_heatmaps
from tooling.models.transpose.network import ONNX_INPUT_NAME, ONNX_OUTPUT_NAME, build_transpose_r
from tooling.models.transpose.processing import TRANSPOSE_R_TOPDOWN, evaluate_transpose_r
from tooling.seeded import apply_seeded_weights
from tooling.slice import AccuracyContext, KnownAnswer, ModelSlice

ANNOTATIONS = "coco/annotations/person_keypoints_val2017.json"
IMAGES = "coco/images/val2017"
CHECKPOINT = "tp_r_256x192_enc3_d256_h1024_mh8.pth"
UPSTREAM_EXPERIMENT = "experiments/coco/transpose_r/TP_R_256x192_d256_h1024_enc3_mh8.yaml"


class TransPoseSlice(ModelSlice):
    name = "transpose"

    def build_network(self, network: str, variant: str = "default") -> torch.nn.Module:
        if network != "transpose_r":
            raise KeyError(f"transpose has no network {network!r}")
        return build_transpose_r()

    def build_upstream_network(self, network: str, checkout) -> torch.nn.Module:
        """The upstream model built from its own experiment yaml (needs yacs, as upstream does)."""
        config = checkout.import_module("config", subdir="lib")
        cfg = config.cfg.clone()
        cfg.defrost()
        cfg.merge_from_file(str(checkout.root / UPSTREAM_EXPERIMENT))
        models = checkout.import_module("models.transpose_r", subdir="lib")
        return models.get_pose_net(cfg, is_train=False).eval()

    def decode(self, network: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        """DARK-decoded keypoints in input-crop pixels and their scores."""
        heatmaps = outputs[ONNX_OUTPUT_NAME]
        width, height = TRANSPOSE_R_TOPDOWN.input_size
        count = len(heatmaps)
        # A box covering the whole crop maps heatmap coordinates onto crop pixels.
        centers = np.tile([(width - 1) / 2, (height - 1) / 2], (count, 1)).astype(np.float32)
        scales = np.tile([width / TRANSPOSE_R_TOPDOWN.pixel_std, height / TRANSPOSE_R_TOPDOWN.pixel_std], (count, 1))
        decoded = decode_heatmaps(heatmaps, centers, scales.astype(np.float32), TRANSPOSE_R_TOPDOWN)
        return {"keypoints_px": decoded.preds, "scores": decoded.maxvals}

    def evaluate(self, ctx: AccuracyContext) -> dict[str, float]:
        dataset = CocoKeypointDataset.open(ctx.data_paths[ANNOTATIONS], ctx.data_paths[IMAGES])
        evaluation = evaluate_transpose_r(
            dataset,
            lambda crops: ctx.run("transpose_r", {ONNX_INPUT_NAME: crops})[ONNX_OUTPUT_NAME],
            batch_size=ctx.dims["batch"],
            limit=ctx.limit,
            results_path=ctx.scratch / "keypoint_results.json" if ctx.scratch else None,
            progress=lambda p: ctx.progress(p.images_done, p.images_total, "images"),
            store=ctx.results,
        )
        return {**evaluation.stats, "images": float(len(evaluation.image_ids)), "persons": float(evaluation.num_samples)}

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """A synthetic COCO set scored through an oracle that answers each crop with its ground
        truth: every stage around the network must be exact for AP and AR to be 1.0."""
        data_root = root / "data"
        dataset = write_synthetic_coco(data_root / "coco", seed=3, num_images=6)
        annotation_path, image_dir = coco_layout(data_root / "coco")
        assert annotation_path == data_root / ANNOTATIONS and image_dir == data_root / IMAGES
        weights = root / "weights" / self.name
        weights.mkdir(parents=True)
        torch.save(apply_seeded_weights(build_transpose_r(), "known-answer").state_dict(), weights / CHECKPOINT)
        samples = build_topdown_samples(dataset.coco, TRANSPOSE_R_TOPDOWN)
        oracle = GroundTruthHeatmapOracle(dataset, samples, TRANSPOSE_R_TOPDOWN)
        return KnownAnswer(
            data_root=data_root,
            weights_root=root / "weights",
            expected={"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AR": 1.0},
            tolerance=1e-9,
            profile="smoke",
            oracles={"transpose_r": lambda feeds: {ONNX_OUTPUT_NAME: oracle(feeds[ONNX_INPUT_NAME])}},
        )


SLICE = TransPoseSlice()
