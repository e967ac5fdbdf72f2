"""TransPose-R-A3 as the engine sees it: network, heatmap decoding, COCO accuracy, known answer."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from tooling.calibration import channels_last, ridge_readout, set_conv1x1
from tooling.coco.dataset import CocoKeypointDataset, read_image_rgb
from tooling.coco.evaluation import first_image_ids
from tooling.coco.pictures import keypoint_disagreement, worst_item
from tooling.coco.synthetic import (
    STAGED_ANNOTATIONS,
    STAGED_IMAGES,
    GroundTruthHeatmapOracle,
    perfect_score_answer,
    stage_synthetic_coco,
)
from tooling.coco.topdown import build_topdown_samples, decode_heatmaps, preprocess_sample
from tooling.coco.transforms import flip_width
from tooling.models.transpose.network import ONNX_INPUT_NAME, ONNX_OUTPUT_NAME, build_transpose_r
from tooling.coco.pipeline import ImageCache, decode_batch, merge_batches, plan_topdown, score_topdown, topdown_batches
from tooling.models.transpose.processing import TRANSPOSE_R_TOPDOWN
from tooling.seeded import apply_seeded_weights
from tooling.sources import build_from_experiment
from tooling.slice import AccuracyContext, KnownAnswer, ModelSlice, PassSample

CHECKPOINT = "tp_r_256x192_enc3_d256_h1024_mh8.pth"
UPSTREAM_EXPERIMENT = "experiments/coco/transpose_r/TP_R_256x192_d256_h1024_enc3_mh8.yaml"


class TransPoseSlice(ModelSlice):
    name = "transpose"
    builders = {"transpose_r": build_transpose_r}

    def build_upstream_network(self, network: str, checkout) -> torch.nn.Module:
        """The upstream model built from its own experiment yaml (needs yacs, as upstream does)."""
        return build_from_experiment(checkout, "models.transpose_r", UPSTREAM_EXPERIMENT)

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

    def disagreement_picture(self, network, feeds, reference, actual):
        """The crop that differs most, with torch eager's and the backend's keypoints over it."""
        i = worst_item(reference[ONNX_OUTPUT_NAME], actual[ONNX_OUTPUT_NAME])
        ref, act = (self.decode(network, feeds, o)["keypoints_px"][i] for o in (reference, actual))
        return keypoint_disagreement(feeds[ONNX_INPUT_NAME][i], ref[None], act[None],
                                     reference[ONNX_OUTPUT_NAME][i], actual[ONNX_OUTPUT_NAME][i])

    accuracy_unit = "persons"

    def accuracy_samples(self, ctx: AccuracyContext) -> list[PassSample]:
        """The GT-box crops of the first ``limit`` images, in batches of the profile's size (the
        batch is the record: a backend's figures may depend on what shares its batch)."""
        _, samples = _plan(ctx)
        return [PassSample(key, samples[batch], batch.stop - batch.start)
                for key, batch in topdown_batches(samples, ctx.dims["batch"])]

    def score_sample(self, ctx: AccuracyContext, sample: PassSample, advance) -> dict[str, np.ndarray]:
        dataset = _dataset(ctx)
        return decode_batch(
            dataset, sample.item, lambda crops: ctx.run("transpose_r", {ONNX_INPUT_NAME: crops})[ONNX_OUTPUT_NAME],
            TRANSPOSE_R_TOPDOWN, batch_size=ctx.dims["batch"], flip_test=True, pad_batches=True,
            images=ctx.once("images", lambda: ImageCache(dataset)),
        )

    def merge_records(self, ctx: AccuracyContext, samples: list[PassSample], records) -> dict[str, float]:
        """Every batch's keypoints into one results file (rescoring, OKS-NMS), then one COCOeval."""
        image_ids, persons = _plan(ctx)
        predictions = merge_batches([p for sample in samples for p in sample.item], records, TRANSPOSE_R_TOPDOWN)
        stats, _ = score_topdown(_dataset(ctx), predictions, TRANSPOSE_R_TOPDOWN, image_ids,
                                 ctx.scratch / "keypoint_results.json" if ctx.scratch else None)
        return {**stats, "images": float(len(image_ids)), "persons": float(len(persons))}

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """A synthetic COCO set scored through an oracle that answers each crop with its ground
        truth: every stage around the network must be exact for AP and AR to be 1.0."""
        state = apply_seeded_weights(build_transpose_r(), "known-answer").state_dict()
        dataset = stage_synthetic_coco(root, self.name, {CHECKPOINT: state}, seed=3, num_images=6)
        samples = build_topdown_samples(dataset.coco, TRANSPOSE_R_TOPDOWN)
        oracle = GroundTruthHeatmapOracle(dataset, samples, TRANSPOSE_R_TOPDOWN)
        return perfect_score_answer(
            root, {"transpose_r": lambda feeds: {ONNX_OUTPUT_NAME: oracle(feeds[ONNX_INPUT_NAME])}}
        )

    calibrates_agreement = True

    @torch.no_grad()
    def calibrate_agreement(
        self, answer: KnownAnswer, samples: int, weights_root: Path, dims: dict[str, int]
    ) -> None:
        """Seeded weights (salt ``agreement``) with two changes, so that AP and AR on the first
        ``samples`` images sit strictly between 0 and 1 (measured about 0.4 and 0.5):

        - each encoder layer's residual branches are silenced (attention ``out_proj`` and
          ``linear2`` zero): each token keeps its own image content through the LayerNorms, where
          random attention would mix the whole crop and leave nothing a 1x1 head can localise;
        - ``final_layer`` (1x1, 256 -> 17) is the ridge least-squares readout from the deconv
          features to unit Gaussians (sigma 1 heatmap pixel) at the ground-truth joints, over the
          GT-box crops of those images and their mirrors, as the flip test feeds them.
        """
        dataset = CocoKeypointDataset.open(answer.data_root / STAGED_ANNOTATIONS, answer.data_root / STAGED_IMAGES)
        samples_ = build_topdown_samples(dataset.coco, TRANSPOSE_R_TOPDOWN, first_image_ids(dataset.coco, samples))
        crops = []
        for sample in samples_:
            crop = preprocess_sample(read_image_rgb(dataset.image_path(sample.image_id)), sample, TRANSPOSE_R_TOPDOWN)
            crops += [crop, flip_width(crop)]
        crops = np.stack(crops)
        targets = GroundTruthHeatmapOracle(dataset, samples_, TRANSPOSE_R_TOPDOWN, sigma=1.0)(crops)
        network = apply_seeded_weights(build_transpose_r(), "agreement")
        for layer in network.global_encoder.layers:
            for silenced in (layer.self_attn.out_proj, layer.linear2):
                silenced.weight.zero_()
                silenced.bias.zero_()
        features = network.backbone(torch.from_numpy(crops))
        batch, channels, height, width = features.shape
        grid = network.encode(features).permute(1, 2, 0).reshape(batch, channels, height, width)
        weight, bias = ridge_readout(channels_last(network.deconv_layers(grid)),
                                     targets.transpose(0, 2, 3, 1).reshape(-1, targets.shape[1]))
        set_conv1x1(network.final_layer, weight, bias)
        (weights_root / self.name).mkdir(parents=True)
        torch.save(network.state_dict(), weights_root / self.name / CHECKPOINT)


def _dataset(ctx: AccuracyContext) -> CocoKeypointDataset:
    return ctx.once("dataset", lambda: CocoKeypointDataset.open(ctx.data_paths[STAGED_ANNOTATIONS],
                                                                ctx.data_paths[STAGED_IMAGES]))


def _plan(ctx: AccuracyContext):
    return ctx.once("plan", lambda: plan_topdown(_dataset(ctx), TRANSPOSE_R_TOPDOWN, ctx.limit))


SLICE = TransPoseSlice()
