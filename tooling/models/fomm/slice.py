"""FOMM as the engine sees it: two chained networks, the reconstruction protocol, AKD/MKR/L1.

Networks: ``kp_detector`` and ``generator`` are deployed; ``pose_estimator`` scores the
reconstructions on the host (it has a golden but no deployed profile). Generator variants:
``grid_sample`` (ONNX GridSample, opset 16+; ORT, OpenVINO), ``gather`` (the guide's opset-11
sampler, for ATC) and ``upstream_align_corners`` (unpatched upstream under modern torch, which
warps with align_corners=False; torch only, for its golden and comparisons).

Upstream (``port-vs-upstream``): the detector and generator from first-order-model's ``modules/``
with the constructor arguments of ``config/taichi-256.yaml`` (common params merged with each
network's, as upstream's run.py does), the generator patched to the guide's warps
(``patches/fomm/``); the pose net from the pose repository's ``network/rtpose_vgg.get_model('vgg19')``.
Each answers under the port's input and output names, set as its ``forward`` attribute so that the
state_dict keys (and so the seeded weights) stay upstream's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import yaml

from tooling.models.fomm.calibrate import write_calibrated
from tooling.models.fomm.metric import FrameKeypoints, akd_mkr, frame_l1
from tooling.models.fomm.network import build_generator, build_kp_detector
from tooling.models.fomm.pose import BOX_SIZE, frame_keypoints
from tooling.models.fomm.pose_estimator import build_pose_estimator
from tooling.models.fomm.synthetic import write_test_set
from tooling.models.fomm.video import check_clips, clip_frame_count, frames_to_input, list_clips, read_clip, reconstruction_image, save_reconstruction
from tooling.seeded import apply_seeded_weights
from tooling.pictures import as_image, heat, keypoints_over, panel
from tooling.slice import AccuracyContext, KnownAnswer, ModelSlice, PassSample

TEST_VIDEOS = "taichi/test"
GENERATOR_CHECKPOINT = "taichi-cpk.pth.tar"
POSE_CHECKPOINT = "pose_model.pth"
GENERATOR_VARIANTS = {
    "grid_sample": {"sampler": "grid_sample", "deform_align_corners": True},
    "gather": {"sampler": "gather", "deform_align_corners": True},
    "upstream_align_corners": {"sampler": "grid_sample", "deform_align_corners": False},
}
KNOWN_ANSWER_PROFILE = "smoke"
UPSTREAM_CONFIG = "config/taichi-256.yaml"  # first-order-model's taichi model_params
UPSTREAM_NETWORKS = {  # network -> (module, class, model_params section)
    "kp_detector": ("modules.keypoint_detector", "KPDetector", "kp_detector_params"),
    "generator": ("modules.generator", "OcclusionAwareGenerator", "generator_params"),
}
UPSTREAM_POSE_TRUNK = "vgg19"  # what pose-evaluation's extract.py asks get_model for

Run = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def keypoints_px(value: np.ndarray, height: int, width: int) -> np.ndarray:
    """Keypoints in [-1, 1] (x, y) -> pixels of an (height, width) frame, pixel centres at -1 and 1."""
    scale = np.array([width - 1, height - 1], np.float64)
    return (np.asarray(value, np.float64) + 1) / 2 * scale


def reconstruct_clip(run: Run, frames: np.ndarray, on_frame: Callable[[int], None] = lambda t: None) -> np.ndarray:
    """Predictions (T, 3, H, W) for a clip: source = frame 0, every frame (0 included) driving."""
    inputs = frames_to_input(frames)
    source = inputs[:1]
    kp_source = run("kp_detector", {"input": source})
    predictions = []
    for t in range(len(inputs)):
        kp_driving = run("kp_detector", {"input": inputs[t : t + 1]})
        out = run("generator", {
            "source_imgs": source,
            "kp_driving_value": kp_driving["value"], "kp_driving_jac": kp_driving["jacobian"],
            "kp_source_value": kp_source["value"], "kp_source_jac": kp_source["jacobian"],
        })
        predictions.append(out["prediction"][0])
        on_frame(t)
    return np.stack(predictions)


class FommSlice(ModelSlice):
    name = "fomm"

    def build_network(self, network: str, variant: str = "default") -> torch.nn.Module:
        if network == "kp_detector":
            return build_kp_detector()
        if network == "generator":
            options = GENERATOR_VARIANTS.get("grid_sample" if variant == "default" else variant)
            if options is None:
                raise KeyError(f"fomm generator has no variant {variant!r}; known: {sorted(GENERATOR_VARIANTS)}")
            return build_generator(**options)
        if network == "pose_estimator":
            return build_pose_estimator()
        raise KeyError(f"fomm has no network {network!r}")

    def build_upstream_network(self, network: str, checkout) -> torch.nn.Module:
        if network == "pose_estimator":
            return _upstream_pose_estimator(checkout)
        if network not in UPSTREAM_NETWORKS:
            raise KeyError(f"no upstream builder for fomm network {network!r}")
        module, cls, section = UPSTREAM_NETWORKS[network]
        config_path = checkout.root / UPSTREAM_CONFIG
        try:
            model_params = yaml.safe_load(config_path.read_text())["model_params"]
            arguments = {**model_params["common_params"], **model_params[section]}
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{config_path}: cannot read model_params.common_params and {section} ({exc})") from exc
        model = getattr(checkout.import_module(module), cls)(**arguments).eval()
        if network == "generator":
            upstream_forward = model.forward

            def flat_keypoints(source_imgs, kp_driving_value, kp_driving_jac, kp_source_value, kp_source_jac):
                return upstream_forward(source_imgs, {"value": kp_driving_value, "jacobian": kp_driving_jac},
                                        {"value": kp_source_value, "jacobian": kp_source_jac})

            model.forward = flat_keypoints
        return model

    def example_inputs(self, spec, network: str, dims: dict[str, int], seed: int = 0):
        """Image-like inputs in [0, 1]; for the generator, keypoints in [-1, 1] and jacobians near
        the identity, as the goldens draw them (a randn jacobian can be singular)."""
        rng = np.random.default_rng(seed)
        shapes = {i.name: i.concrete_shape(dims) for i in spec.networks[network].inputs}
        feeds = {}
        for name, shape in shapes.items():
            if name.endswith("_jac"):
                feeds[name] = (np.eye(2) + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            elif name.endswith("_value"):
                feeds[name] = rng.uniform(-1, 1, shape).astype(np.float32)
            elif network == "pose_estimator":
                feeds[name] = (rng.uniform(0, 1, shape) - 0.5).astype(np.float32)
            else:
                feeds[name] = rng.uniform(0, 1, shape).astype(np.float32)
        return feeds

    def chain_inputs(self, spec, chain: str, dims: dict[str, int], seed: int = 0):
        """Frames in [0, 1]: the chain starts from images, as the reconstruction does."""
        rng = np.random.default_rng(seed)
        return {i.name: rng.uniform(0, 1, i.concrete_shape(dims)).astype(np.float32) for i in spec.chains[chain].inputs}

    def decode(self, network: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        """Detector: keypoints in input pixels. Generator: the reconstruction as saved (uint8 HWC)."""
        if network == "kp_detector":
            height, width = feeds["input"].shape[2:]
            return {"keypoints_px": keypoints_px(outputs["value"], height, width)}
        if network == "generator":
            return {"frame_uint8": np.stack([reconstruction_image(p[None]) for p in outputs["prediction"]])}
        raise KeyError(f"fomm decodes no outputs of {network!r}")

    def disagreement_picture(self, network, feeds, reference, actual):
        """Generator: the source frame, torch eager's and the backend's reconstruction and their
        difference. Detector: both keypoint sets over the frame."""
        if network == "generator":
            ref, act = (np.asarray(o["prediction"], np.float64) for o in (reference, actual))
            i = int(np.abs(act - ref).reshape(len(ref), -1).max(axis=1).argmax())
            return panel([("source frame", as_image(feeds["source_imgs"][i])),
                          ("torch eager reconstruction", as_image(ref[i])), ("backend reconstruction", as_image(act[i])),
                          heat(np.abs(act[i] - ref[i]).max(axis=0), "|difference|")],
                         footer=f"item {i} of {len(ref)}; reconstructions shown on their own range")
        if network == "kp_detector":
            ref, act = (self.decode(network, feeds, o)["keypoints_px"] for o in (reference, actual))
            i = int(np.abs(act - ref).reshape(len(ref), -1).max(axis=1).argmax())
            return panel([keypoints_over(feeds["input"][i], ref[i], act[i], "keypoints: torch (green) vs backend (red)")],
                         footer=f"largest keypoint move {np.abs(act[i] - ref[i]).max():.3g} px")
        return None

    def run_chain(self, chain: str, run: Run, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reconstruction chain on two frames (source, driving) fed to the detector: the
        generator's keypoint inputs are the detector's outputs."""
        if chain != "reconstruction":
            raise KeyError(f"fomm has no chain {chain!r}")
        frames = feeds["input"]
        kp_source = run("kp_detector", {"input": frames[:1]})
        kp_driving = run("kp_detector", {"input": frames[1:2]})
        out = run("generator", {
            "source_imgs": frames[:1],
            "kp_driving_value": kp_driving["value"], "kp_driving_jac": kp_driving["jacobian"],
            "kp_source_value": kp_source["value"], "kp_source_jac": kp_source["jacobian"],
        })
        height, width = frames.shape[2:]
        return {
            "driving_keypoints_px": keypoints_px(kp_driving["value"], height, width),
            "prediction": out["prediction"],
            "frame_uint8": reconstruction_image(out["prediction"]),
        }

    # -- accuracy -------------------------------------------------------------------------------
    accuracy_unit = "frames"

    def accuracy_samples(self, ctx: AccuracyContext) -> list[PassSample]:
        clips = list_clips(ctx.data_paths[TEST_VIDEOS])
        if ctx.limit is not None:
            clips = clips[: ctx.limit]
        if not clips:
            raise RuntimeError(f"{ctx.data_paths[TEST_VIDEOS]}: no clips (mp4 files or frame folders)")
        check_clips(clips, int(ctx.dims["width"]), int(ctx.dims["height"]))
        return [PassSample(clip.name, clip, clip_frame_count(clip)) for clip in clips]

    def score_sample(self, ctx: AccuracyContext, sample: PassSample, advance) -> dict[str, np.ndarray]:
        box = int(ctx.dims.get("pose_box", BOX_SIZE))
        png_dir = (ctx.scratch or Path(".")) / "reconstruction" / "png"
        return self._score_clip(ctx, sample.item, png_dir, box, lambda t: advance(t + 1))

    def merge_records(self, ctx: AccuracyContext, samples: list[PassSample], records) -> dict[str, float]:
        """The keypoint tables of every clip, paired as cmp_with_missing pairs them (sorted by file
        name and frame), and L1 over every frame in clip order."""
        gt_rows, gen_rows, l1 = [], [], []
        for sample, record in zip(samples, records):
            name = sample.item.name
            l1.append(record["l1"])
            for t in range(len(record["l1"])):
                gt_rows.append(FrameKeypoints(name, t, record["gt_keypoints"][t]))
                gen_rows.append(FrameKeypoints(f"{name}.png", t, record["gen_keypoints"][t]))
        scores = akd_mkr(gt_rows, gen_rows)
        l1_all = np.concatenate(l1)
        return {"AKD": scores["AKD"], "MKR": scores["MKR"], "L1": float(l1_all.mean()),
                "frames": float(len(l1_all)), "clips": float(len(samples)),
                "akd_frames": scores["akd_frames"], "mkr_frames": scores["mkr_frames"]}

    def sample_figures(self, record) -> dict[str, float]:
        """Per clip: AKD and MKR over its frames (the pass's own pairing, one clip) and L1."""
        frames = range(len(record["l1"]))
        scores = akd_mkr([FrameKeypoints("clip", t, record["gt_keypoints"][t]) for t in frames],
                         [FrameKeypoints("clip.png", t, record["gen_keypoints"][t]) for t in frames])
        return {"AKD": float(scores["AKD"]), "MKR": float(scores["MKR"]), "L1": float(np.mean(record["l1"]))}

    @staticmethod
    def _score_clip(ctx: AccuracyContext, clip: Path, png_dir: Path, box: int, progress) -> dict[str, np.ndarray]:
        frames = read_clip(clip)
        predictions = reconstruct_clip(ctx.run, frames, progress)
        saved = save_reconstruction(png_dir, clip, predictions)
        generated = read_clip(saved)  # the stacked PNG, split back into frames
        pose = lambda feeds: ctx.run_host("pose_estimator", feeds)  # noqa: E731
        return {
            "l1": frame_l1(predictions, frames_to_input(frames)),
            "gt_keypoints": np.stack([frame_keypoints(f, pose, box) for f in frames]),
            "gen_keypoints": np.stack([frame_keypoints(f, pose, box) for f in generated]),
        }

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """Two 128x128 clips (an mp4 and a frame folder) scored through oracles (see synthetic.py):
        AKD 0, MKR and L1 known from the construction. The staged checkpoints are seeded; the
        agreement gate runs the real networks on the same set with calibrated ones
        (``calibrate_agreement``)."""
        oracles, expected = write_test_set(root / "data" / TEST_VIDEOS, size=128)
        weights = root / "weights" / self.name
        weights.mkdir(parents=True)

        def seeded(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
            # Built on the meta device: torch's random init of 111 M parameters would be thrown
            # away by the seeded values. Half precision halves the ~440 MB written per run;
            # loading widens the values back to float32, and seeded values need no more.
            with torch.device("meta"):
                network = build()
            network = network.to_empty(device="cpu")
            for buffer in network.buffers():
                if not buffer.is_floating_point():
                    buffer.zero_()  # num_batches_tracked: the seeded recipe leaves it alone
            state = apply_seeded_weights(network, "known-answer").state_dict()
            return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

        torch.save({"kp_detector": seeded(build_kp_detector), "generator": seeded(build_generator)},
                   weights / GENERATOR_CHECKPOINT)
        torch.save(seeded(build_pose_estimator), weights / POSE_CHECKPOINT)
        return KnownAnswer(root / "data", root / "weights", expected, tolerance=1e-6,
                           profile=KNOWN_ANSWER_PROFILE, oracles=oracles.as_dict())

    calibrates_agreement = True

    def calibrate_agreement(
        self, answer: KnownAnswer, samples: int, weights_root: Path, dims: dict[str, int]
    ) -> None:
        """Seeded weights (salt ``agreement``) with the keypoint detector's jacobians set to the
        identity, the generator's appearance path carrying red and green to a ridge readout of the
        driving frames, and the pose net's heatmap head a ridge readout of its trunk features to
        the visible joints, fitted on the first ``samples`` clips (calibrate.py says how and why),
        so that AKD is a few pixels and MKR strictly between 0 and 1 on them."""
        clips = [read_clip(clip) for clip in list_clips(answer.data_root / TEST_VIDEOS)[:samples]]
        box = int(dims.get("pose_box", BOX_SIZE))
        write_calibrated(clips, box, weights_root / self.name, GENERATOR_CHECKPOINT, POSE_CHECKPOINT)


def _upstream_pose_estimator(checkout) -> torch.nn.Module:
    """rtpose's CPM answering stage 6 only (upstream returns it with every stage's maps for the
    training loss), under the port's output names."""
    model = checkout.import_module("network.rtpose_vgg").get_model(UPSTREAM_POSE_TRUNK).eval()
    upstream_forward = model.forward

    def stage_six(image):
        (paf, heatmap), _every_stage = upstream_forward(image)
        return {"paf": paf, "heatmap": heatmap}

    model.forward = stage_six
    return model


SLICE = FommSlice()
