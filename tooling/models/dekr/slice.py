"""DEKR as the engine sees it: network variants, bottom-up decoding, COCO accuracy, known answer."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from tooling.calibration import channels_last, pass_through_batchnorm, ridge_readout, set_conv1x1, silence
from tooling.coco.dataset import CocoKeypointDataset, read_image_rgb
from tooling.coco.pictures import keypoint_disagreement, worst_item
from tooling.coco.evaluation import KEYPOINT_STAT_NAMES, evaluate_keypoints, first_image_ids, write_results_json
from tooling.coco.synthetic import STAGED_ANNOTATIONS, STAGED_IMAGES, perfect_score_answer, stage_synthetic_coco
from tooling.coco.transforms import affine_transform_points
from tooling.models.dekr import deform_conv
from tooling.models.dekr.network import (
    NUM_JOINTS,
    OFFSET_CHANNELS_PER_JOINT,
    OUTPUT_STRIDE,
    STAGE_CHANNELS,
    build_hrnet_dekr,
)
from tooling.models.dekr.processing import (
    FLIP_INDEX,
    FLIP_INDEX_WITH_CENTER,
    affine_matrix,
    coco_results,
    decode_poses,
    postprocess,
    preprocess,
)
from tooling.models.dekr.rescore import RESCORE_FEATURES, build_rescore
from tooling.seeded import apply_seeded_weights
from tooling.sources import build_from_experiment
from tooling.slice import AccuracyContext, KnownAnswer, ModelSlice, PassSample

UPSTREAM_EXPERIMENT = "experiments/coco/w32/w32_4x_reg03_bs10_512_adam_lr1e-3_coco_x140.yaml"
UPSTREAM_RESCORE_EXPERIMENT = "experiments/coco/rescore_coco.yaml"
# Upstream module and builder arguments per network (lib/models/<module>.get_pose_net(cfg, *args)).
UPSTREAM_BUILDERS = {
    "hrnet_dekr": ("models.hrnet_dekr", UPSTREAM_EXPERIMENT, ()),
    "rescore": ("models.predictOKS", UPSTREAM_RESCORE_EXPERIMENT, (RESCORE_FEATURES,)),
}
CHECKPOINTS = {"hrnet_dekr": "pose_dekr_hrnetw32_coco.pth", "rescore": "final_rescore_coco_kpt.pth"}


class DekrSlice(ModelSlice):
    name = "dekr"

    def build_network(self, network: str, variant: str = "grid_sample") -> torch.nn.Module:
        if network == "hrnet_dekr":
            return build_hrnet_dekr(variant)
        if network == "rescore":
            return build_rescore()
        raise KeyError(f"dekr has no network {network!r}")

    def build_upstream_network(self, network: str, checkout) -> torch.nn.Module:
        """Upstream's model from its experiment yaml (needs yacs). Upstream's ``lib/models`` package
        imports torchvision.ops for every network; where torchvision cannot be imported, its
        DeformConv2d is served by ONNX Runtime (``upstream_ops``), recorded in ``checkout.stand_ins``."""
        from tooling.models.dekr.upstream_ops import torchvision_stand_ins

        if network not in UPSTREAM_BUILDERS:
            raise KeyError(f"no upstream builder for dekr network {network!r}")
        module, experiment, args = UPSTREAM_BUILDERS[network]
        return build_from_experiment(checkout, module, experiment, *args, stand_ins=torchvision_stand_ins())

    def export_extras(self, network: str, variant: str, exporter: str) -> dict[str, Any]:
        return deform_conv.export_extras(variant, exporter) if network == "hrnet_dekr" else {}

    def disagreement_picture(self, network, feeds, reference, actual):
        """The canvas whose heatmaps differ most, with every pose torch eager and the backend
        decode from it (the rescoring net's scores have no picture)."""
        if network != "hrnet_dekr":
            return None
        i = worst_item(reference["heatmap"], actual["heatmap"])
        item = {"image": feeds["image"][i : i + 1]}
        ref, act = (self.decode(network, item, {k: o[k][i : i + 1] for k in ("heatmap", "offset")})["poses_px"][..., :2]
                    for o in (reference, actual))
        return keypoint_disagreement(feeds["image"][i], ref, act, reference["heatmap"][i], actual["heatmap"][i])

    def decode(self, network: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        """Poses on the canvas (pixels) and their scores, decoded from each batch item.

        Parity inputs are not images, so the item's own outputs stand in for the flipped pass: the
        decoder still runs every stage (fusion, centres, offsets, heat values, NMS) on what the
        backend returned.
        """
        poses, scores = [], []
        for i in range(len(feeds["image"])):
            hm, off = outputs["heatmap"][i : i + 1], outputs["offset"][i : i + 1]
            decoded = decode_poses(hm, off, hm, off)
            poses.append(decoded.poses.numpy())
            scores.append(decoded.scores.numpy())
        return {"poses_px": np.concatenate(poses), "pose_scores": np.concatenate(scores)}

    accuracy_unit = "images"

    def accuracy_samples(self, ctx: AccuracyContext) -> list[PassSample]:
        return [PassSample(f"image-{image_id}", image_id) for image_id in first_image_ids(_dataset(ctx).coco, ctx.limit)]

    def score_sample(self, ctx: AccuracyContext, sample: PassSample, advance) -> dict[str, np.ndarray]:
        return _detect(ctx, _dataset(ctx), sample.item, ctx.host_network("rescore"))

    def sample_figures(self, record) -> dict[str, float]:
        """Per image: how many poses were kept and the best pose score (an image's share of AP
        exists only inside COCOeval's accumulation, so it is not listed)."""
        scores = np.asarray(record["scores"], np.float64).ravel()
        return {"poses": float(scores.size), "best_score": float(scores.max()) if scores.size else 0.0}

    def merge_records(self, ctx: AccuracyContext, samples: list[PassSample], records) -> dict[str, float]:
        """Every image's detections in one results file, then one COCOeval over the pass's images."""
        image_ids = [sample.item for sample in samples]
        results = []
        for image_id, record in zip(image_ids, records):
            results += coco_results(torch.from_numpy(record["poses"]), torch.from_numpy(record["scores"]), image_id)
        if results:
            path = (ctx.scratch or Path(".")) / "keypoint_results.json"
            write_results_json(results, path)
            stats = evaluate_keypoints(_dataset(ctx).coco, path, image_ids)
        else:
            # Nobody detected (an untrained network, say): every person is missed, AP = AR = 0.
            stats = dict.fromkeys(KEYPOINT_STAT_NAMES, 0.0)
        return {**stats, "images": float(len(image_ids)), "detections": float(len(results))}

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """A synthetic COCO set scored through an oracle that answers each canvas (and its mirror)
        with ideal centre heatmaps and offsets: every stage around the network must be exact for
        AP and AR to be 1.0."""
        states = {
            file: apply_seeded_weights(self.build_network(network, "grid_sample"), "known-answer").state_dict()
            for network, file in CHECKPOINTS.items()
        }
        dataset = stage_synthetic_coco(root, self.name, states, seed=5, num_images=5)
        return perfect_score_answer(root, {"hrnet_dekr": IdealBottomUpOracle(dataset)})

    calibrates_agreement = True

    @torch.no_grad()
    def calibrate_agreement(
        self, answer: KnownAnswer, samples: int, weights_root: Path, dims: dict[str, int]
    ) -> None:
        """Seeded weights (salt ``agreement``) whose heads read the 480-channel HRNet features
        linearly, so that AP and AR on the first ``samples`` images sit strictly between 0 and 1:

        - ``transition_heatmap`` (1x1 conv + BN + ReLU) is the ridge least-squares readout from the
          backbone features to the ideal oracle's maps (Gaussians of height ``CALIBRATION_PEAK``,
          sigma 1 cell, at the joints and person centres), joint and centre pixels weighted up; the head's BasicBlock adds
          nothing (its last BN silenced) and its 1x1 conv passes those 18 channels through;
        - each joint's offsets are read the same way from the high-resolution branch's 32 channels,
          fitted on the cells around each person's centre (the decoder reads them at the centre)
          to point at that person's joints: ``transition_offset``
          holds +/- the readout per joint (ReLU keeps either sign), the adaptive blocks add nothing
          and ``offset_final_layer`` takes the differences;
        - the rescoring net answers 1 (``l3`` zero, bias 1): a detection's score is the decoder's.
        Plain and mirrored canvases are both fitted, as the flip test feeds them.
        """
        dataset = CocoKeypointDataset.open(answer.data_root / STAGED_ANNOTATIONS, answer.data_root / STAGED_IMAGES)
        network = apply_seeded_weights(build_hrnet_dekr("grid_sample"), "agreement")
        features, heatmaps, offsets, near = [], [], [], []
        for image_id in first_image_ids(dataset.coco, samples):
            inputs = preprocess(read_image_rgb(dataset.image_path(image_id)))
            heatmap, offset, mask = _calibration_targets(dataset, image_id, inputs.geometry)
            mirrored = IdealBottomUpOracle._mirrored(heatmap, offset)
            for image, maps, offs, cells in ((inputs.image, heatmap, offset, mask),
                                             (inputs.flipped, mirrored["heatmap"], mirrored["offset"], mask[:, ::-1])):
                features.append(channels_last(network.backbone(image)))
                heatmaps.append(maps[0].reshape(len(maps[0]), -1).T)
                offsets.append(offs[0].reshape(len(offs[0]), -1).T)
                near.append(cells.reshape(-1))
        features, heatmaps, near = np.concatenate(features), np.concatenate(heatmaps), np.concatenate(near)
        offsets = np.concatenate(offsets)[near]
        peaks = heatmaps.max(axis=1) > 0.5
        weight, bias = ridge_readout(features, CALIBRATION_PEAK * heatmaps, 1.0 + CALIBRATION_PEAK_WEIGHT * peaks)
        transition, bn = network.transition_heatmap[0], network.transition_heatmap[1]
        set_conv1x1(transition, weight)
        pass_through_batchnorm(bn, bias)
        silence(network.head_heatmap[0][0].bn2)
        set_conv1x1(network.head_heatmap[1], np.eye(len(weight), transition.out_channels))
        # (34, 32): x, y per joint, from the high-resolution branch only (see the docstring)
        weight, bias = ridge_readout(features[near][:, :OFFSET_READOUT_CHANNELS], offsets)
        signed = np.zeros((network.transition_offset[0].out_channels, features.shape[1]))
        signed_bias = np.zeros(len(signed))
        difference = np.zeros((2, OFFSET_CHANNELS_PER_JOINT))
        difference[0, :2], difference[1, 2:4] = (1, -1), (1, -1)
        for joint in range(NUM_JOINTS):
            rows = slice(joint * OFFSET_CHANNELS_PER_JOINT, joint * OFFSET_CHANNELS_PER_JOINT + 4)
            x, y = 2 * joint, 2 * joint + 1
            signed[rows, :OFFSET_READOUT_CHANNELS] = weight[[x, x, y, y]] * np.array([1, -1, 1, -1])[:, None]
            signed_bias[rows] = bias[[x, x, y, y]] * np.array([1, -1, 1, -1])
            for block in network.offset_feature_layers[joint]:
                silence(block.bn)
            set_conv1x1(network.offset_final_layer[joint], difference)
        set_conv1x1(network.transition_offset[0], signed)
        pass_through_batchnorm(network.transition_offset[1], signed_bias)
        rescore = apply_seeded_weights(build_rescore(), "agreement")
        rescore.l3.weight.zero_()
        rescore.l3.bias.fill_(1.0)
        (weights_root / self.name).mkdir(parents=True)
        torch.save(network.state_dict(), weights_root / self.name / CHECKPOINTS["hrnet_dekr"])
        torch.save(rescore.state_dict(), weights_root / self.name / CHECKPOINTS["rescore"])


# Calibration targets: Gaussians one output cell wide, joint and centre pixels weighted this much
# more. Offsets are fitted on the cells within this many cells of each person's centre (about a
# person's extent, where DEKR trains them) and read from the stride-4 branch's channels only: all
# 480 channels, or a small window, reproduce the centre cell's offsets exactly (AP 1.0); this
# readout leaves joint errors of a few pixels (OKS about 0.74 on the agreement image).
CALIBRATION_SIGMA = 1.0
CALIBRATION_PEAK_WEIGHT = 10.0
# Height of the fitted Gaussians: the readout's centre peak (about a third of it) stays above the
# decoder's centre threshold (0.01), and its rounding inside the absolute heatmap tolerances set on
# seeded outputs: at height 1, ONNX Runtime differed by 2.3e-4 at the canvas border; at 0.1,
# OpenVINO by 1.3e-4 (atol 1e-4).
CALIBRATION_PEAK = 0.05
CALIBRATION_CENTRE_RADIUS = 12
OFFSET_READOUT_CHANNELS = STAGE_CHANNELS[-1][0]


def _calibration_targets(dataset: CocoKeypointDataset, image_id: int, geometry) -> tuple[np.ndarray, ...]:
    """The ideal heatmaps (sigma ``CALIBRATION_SIGMA``), offsets that point from every cell near a
    person's centre at its joints (unlabelled joints: at the centre), and the mask of those cells."""
    annotations = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id], iscrowd=False))
    people = [np.asarray(a["keypoints"], np.float64).reshape(NUM_JOINTS, 3) for a in annotations
              if a.get("num_keypoints", 0) > 0]
    width, height = geometry.bucket_wh[0] // OUTPUT_STRIDE, geometry.bucket_wh[1] // OUTPUT_STRIDE
    heatmap, _ = IdealBottomUpOracle.plain(people, affine_matrix(geometry), (width, height), CALIBRATION_SIGMA)
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    offset = np.zeros((NUM_JOINTS, 2, height, width), np.float32)
    mask = np.zeros((height, width), bool)
    for keypoints in people:
        labelled = keypoints[:, 2] > 0
        joints = affine_transform_points(keypoints[:, :2], affine_matrix(geometry)) / OUTPUT_STRIDE
        centre = np.clip(np.rint(joints[labelled].mean(axis=0)), 0, [width - 1, height - 1])
        targets = np.where(labelled[:, None], joints, centre)
        cells = (np.abs(cols - centre[0]) <= CALIBRATION_CENTRE_RADIUS) & (np.abs(rows - centre[1]) <= CALIBRATION_CENTRE_RADIUS)
        offset[:, 0][:, cells] = cols[cells] - targets[:, :1]
        offset[:, 1][:, cells] = rows[cells] - targets[:, 1:]
        mask |= cells
    return heatmap, offset.reshape(1, 2 * NUM_JOINTS, height, width), mask


def _dataset(ctx: AccuracyContext) -> CocoKeypointDataset:
    return ctx.once("dataset", lambda: CocoKeypointDataset.open(ctx.data_paths[STAGED_ANNOTATIONS],
                                                                ctx.data_paths[STAGED_IMAGES]))


def _detect(ctx: AccuracyContext, dataset: CocoKeypointDataset, image_id: int, rescore_net) -> dict[str, np.ndarray]:
    inputs = preprocess(read_image_rgb(dataset.image_path(image_id)))
    plain = ctx.run("hrnet_dekr", {"image": inputs.image.numpy()})
    flipped = ctx.run("hrnet_dekr", {"image": inputs.flipped.numpy()})
    poses = postprocess(
        (plain["heatmap"], plain["offset"]), (flipped["heatmap"], flipped["offset"]), inputs.geometry, rescore_net
    )
    return {"poses": poses.poses.numpy(), "scores": poses.scores.numpy()}


def _fingerprint(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=16).digest()


class IdealBottomUpOracle:
    """What a perfect DEKR would output for the images of a dataset, for their canvases and mirrors.

    Plain pass: a unit Gaussian at each person's centre cell in the centre channel, unit Gaussians
    at every labelled joint in the joint channels, and at the centre cell the offsets that point
    exactly at the person's joints. Mirrored pass: the outputs that the flip fusion maps back onto
    the plain ones, so the fused result is the plain one. Inputs are recognised by a fingerprint.
    """

    SIGMA = 2.0

    def __init__(self, dataset: CocoKeypointDataset):
        self._answers: dict[bytes, dict[str, np.ndarray]] = {}
        for image_id in dataset.image_ids():
            inputs = preprocess(read_image_rgb(dataset.image_path(image_id)))
            annotations = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id], iscrowd=False))
            people = [np.asarray(a["keypoints"], np.float64).reshape(NUM_JOINTS, 3) for a in annotations
                      if a.get("num_keypoints", 0) > 0]
            grid_wh = (inputs.geometry.bucket_wh[0] // OUTPUT_STRIDE, inputs.geometry.bucket_wh[1] // OUTPUT_STRIDE)
            heatmap, offset = self.plain(people, affine_matrix(inputs.geometry), grid_wh)
            self._answers[_fingerprint(inputs.image.numpy())] = {"heatmap": heatmap, "offset": offset}
            self._answers[_fingerprint(inputs.flipped.numpy())] = self._mirrored(heatmap, offset)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _fingerprint(feeds["image"])
        if key not in self._answers:
            raise KeyError("the oracle was given an input it did not prepare: the pipeline fed something unexpected")
        return self._answers[key]

    @classmethod
    def plain(cls, people, to_canvas: np.ndarray, grid_wh: tuple[int, int],
              sigma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The plain pass's ideal (heatmap, offset) for ``people`` (17 x 3 COCO keypoints each)."""
        sigma = cls.SIGMA if sigma is None else sigma
        width, height = grid_wh
        heatmap = np.zeros((NUM_JOINTS + 1, height, width), np.float32)
        offset = np.zeros((NUM_JOINTS, 2, height, width), np.float32)
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        for keypoints in people:
            labelled = keypoints[:, 2] > 0
            joints = affine_transform_points(keypoints[:, :2], to_canvas) / OUTPUT_STRIDE  # grid units
            centre_x, centre_y = np.clip(np.rint(joints[labelled].mean(axis=0)), 0, [width - 1, height - 1]).astype(int)
            peaks = [(int(j), joints[j]) for j in np.flatnonzero(labelled)] + [(NUM_JOINTS, (centre_x, centre_y))]
            for channel, (x, y) in peaks:
                blob = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
                heatmap[channel] = np.maximum(heatmap[channel], blob)
            targets = np.where(labelled[:, None], joints, [centre_x, centre_y])
            offset[:, :, centre_y, centre_x] = np.array([centre_x, centre_y]) - targets
        return heatmap[None], offset.reshape(1, 2 * NUM_JOINTS, height, width)

    @staticmethod
    def _mirrored(heatmap: np.ndarray, offset: np.ndarray) -> dict[str, np.ndarray]:
        """Invert the flip fusion: mirror columns, swap left/right channels, mirror x positions."""
        width = offset.shape[-1]
        height = offset.shape[-2]
        mirrored_heatmap = heatmap[:, list(FLIP_INDEX_WITH_CENTER), :, ::-1]
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        grid = np.stack([cols, rows]).astype(np.float32)
        positions = grid[None] - offset.reshape(NUM_JOINTS, 2, height, width)  # plain joint positions
        mirrored = positions[list(FLIP_INDEX)][..., ::-1].copy()
        mirrored[:, 0] = width - mirrored[:, 0] - 1
        mirrored_offset = grid[None] - mirrored
        return {
            "heatmap": np.ascontiguousarray(mirrored_heatmap),
            "offset": np.ascontiguousarray(mirrored_offset.reshape(1, 2 * NUM_JOINTS, height, width)),
        }


SLICE = DekrSlice()
