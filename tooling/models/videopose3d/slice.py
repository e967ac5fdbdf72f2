"""VideoPose3D as the engine sees it: network, checkpoint layouts, decoding, accuracy, known answer."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from tooling.models.videopose3d.human36m import (
    DatasetError,
    camera_constants,
    ground_truth_pair,
    load_test_sequences,
    padded_flip_pair,
)
from tooling.models.videopose3d.metric import (
    SequenceError,
    action_wise,
    fuse_flip_pair,
    procrustes_mpjpe,
    sequence_mpjpe,
)
from tooling.models.videopose3d.network import build_vp3d
from tooling.pictures import BACKEND_BGR, PANEL_HEIGHT, TORCH_BGR, draw_points, panel
from tooling.slice import AccuracyContext, KnownAnswer, ModelSlice, PassSample

# The 17-joint Human3.6M skeleton as limbs (joint, parent): hip, right leg, left leg, spine to head,
# left arm, right arm.
H36M_LIMBS = ((1, 0), (2, 1), (3, 2), (4, 0), (5, 4), (6, 5), (7, 0), (8, 7), (9, 8), (10, 9),
              (11, 8), (12, 11), (13, 12), (14, 8), (15, 14), (16, 15))


def _skeleton_view(poses: np.ndarray, colours) -> np.ndarray:
    """Poses (k x 17 x 2, any units, y down) drawn on one square canvas with one shared scale."""
    canvas = np.full((PANEL_HEIGHT, PANEL_HEIGHT, 3), 255, np.uint8)
    low, high = poses.reshape(-1, 2).min(axis=0), poses.reshape(-1, 2).max(axis=0)
    scale = 0.85 * PANEL_HEIGHT / max(float((high - low).max()), 1e-9)
    centre = (low + high) / 2
    for k, (pose, colour) in enumerate(zip(poses, colours)):  # the first (torch eager) drawn wider, underneath
        canvas = draw_points(canvas, (pose - centre) * scale + PANEL_HEIGHT / 2, colour, edges=H36M_LIMBS,
                             under=k == 0 and len(poses) > 1)
    return canvas

POSITIONS_3D = "human36m/data_3d_h36m.npz"
DETECTIONS_2D = "human36m/data_2d_h36m_cpn_ft_h36m_dbb.npz"
# Weights whose layout differs between the Conv1d upstream model and the Conv2d deployed one.
TEMPORAL_CONV_WEIGHTS = ("expand_conv.weight", "shrink.weight")


def _is_temporal_conv_weight(key: str) -> bool:
    return key in TEMPORAL_CONV_WEIGHTS or (key.startswith("layers_conv.") and key.endswith(".weight"))


class VideoPose3DSlice(ModelSlice):
    name = "videopose3d"
    builders = {"vp3d": build_vp3d}

    def adapt_state_dict(self, network: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept DataParallel prefixes and the upstream Conv1d layout (3-D conv weights)."""
        adapted = {}
        for key, value in state.items():
            key = key.replace("module.", "")
            if _is_temporal_conv_weight(key) and value.dim() == 3:
                value = value.unsqueeze(-1)
            adapted[key] = value
        return adapted

    def build_upstream_network(self, network: str, checkout) -> torch.nn.Module:
        model_module = checkout.import_module("common.model")
        return model_module.TemporalModel(
            17, 2, 17, filter_widths=[3, 3, 3, 3, 3], causal=False, dropout=0.25, channels=1024, dense=False
        ).eval()

    def decode(self, network: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        """Fused 3-D joints in millimetres for each (sequence, mirror) pair of the batch."""
        pred = outputs["3d_preds"]
        if pred.shape[0] % 2:
            return {"joints_mm": pred * 1000.0}
        fused = [fuse_flip_pair(pred[i : i + 2], 0) for i in range(0, pred.shape[0], 2)]
        return {"joints_mm": np.stack(fused) * 1000.0}

    def disagreement_picture(self, network, feeds, reference, actual):
        """The frame whose 3-D joints moved most: its 2-D input, and torch eager's (green) and the
        backend's (red) skeletons seen from the front (x, y) and the side (z, y)."""
        ref, act = (np.asarray(o["3d_preds"], np.float64) for o in (reference, actual))
        moved = np.abs(act - ref).max(axis=(-1, -2))  # per (item, frame)
        item, frame = np.unravel_index(int(moved.argmax()), moved.shape)
        inputs = np.asarray(feeds["2d_poses"], np.float64)
        input_frame = min(frame + (inputs.shape[1] - ref.shape[1]) // 2, inputs.shape[1] - 1)  # centre of the receptive field
        tiles = [("2-D input (normalised)", _skeleton_view(inputs[item, input_frame][:, :2][None], [(120, 120, 120)]))]
        for title, axes in (("front (x, y)", (0, 1)), ("side (z, y)", (2, 1))):
            tiles.append((title, _skeleton_view(np.stack([ref[item, frame][:, axes], act[item, frame][:, axes]]),
                                                [TORCH_BGR, BACKEND_BGR])))
        return panel(tiles, footer=f"item {item}, frame {frame}: largest joint move {moved.max():.3g} (metres) "
                                   "torch eager (green) vs backend (red)")

    accuracy_unit = "sequences"

    def accuracy_samples(self, ctx: AccuracyContext) -> list[PassSample]:
        sequences = load_test_sequences(ctx.data_paths[POSITIONS_3D], ctx.data_paths[DETECTIONS_2D])
        if ctx.limit is not None:
            sequences = sequences[: ctx.limit]
        if not sequences:  # a mean over nothing is NaN, not a score
            raise DatasetError(f"{ctx.data_paths[POSITIONS_3D]}: no test sequences to score")
        return [PassSample(seq.stem, seq) for seq in sequences]

    def score_sample(self, ctx: AccuracyContext, sample: PassSample, advance) -> dict[str, np.ndarray]:
        return self._score_sequence(ctx, sample.item, ctx.dims["frames"])

    def merge_records(self, ctx: AccuracyContext, samples: list[PassSample], records) -> dict[str, float]:
        """Frame-weighted sums per action, then the mean over actions (P1 and P2)."""
        errors = [SequenceError(s.item.action, int(r["frames"]), float(r["mpjpe_m"]), float(r["p_mpjpe_m"]))
                  for s, r in zip(samples, records)]
        per_action, p1 = action_wise(errors, "mpjpe_m")
        _, p2 = action_wise(errors, "p_mpjpe_m")
        metrics = {"mpjpe_p1_mm": p1, "mpjpe_p2_mm": p2, "sequences": float(len(errors))}
        metrics.update({f"mpjpe_p1_mm/{action}": value for action, value in per_action.items()})
        return metrics

    @staticmethod
    def _score_sequence(ctx: AccuracyContext, seq, length: int) -> dict[str, np.ndarray]:
        pair, delta = padded_flip_pair(seq.keypoints_2d, length)
        prediction = ctx.run("vp3d", {"2d_poses": pair})["3d_preds"]
        fused = fuse_flip_pair(prediction, delta)
        truth = ground_truth_pair(seq.positions_3d)
        return {
            "frames": np.array(seq.keypoints_2d.shape[0]),
            "mpjpe_m": np.array(sequence_mpjpe(fused, truth)),
            "p_mpjpe_m": np.array(procrustes_mpjpe(fused, truth)),
        }

    def make_known_answer(self, root: Path) -> KnownAnswer:
        return write_known_answer(root)


# -- known answer ----------------------------------------------------------------------------------
# A synthetic Human3.6M-like set plus a hand-built checkpoint whose network outputs, for every
# frame, the normalised 2-D input coordinates of each joint with depth 0. The 2-D detections are
# written so that those coordinates equal the camera-frame root-relative x and y of the 3-D truth,
# so the exact MPJPE is the frame-weighted mean absolute relative depth, which the generator
# computes in float64 from its own construction, independently of the pipeline under test.
KNOWN_ANSWER_ENTRIES = {
    "S9": {"Walking": 40, "Eating": 25, "Walking 1": 31},
    "S11": {"Eating 1": 17, "Walking": 52},
}
EXTRA_DETECTION_FRAMES = (0, 3, 0, 1)  # per camera: detections longer than the mocap get truncated


def _rotation_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = (float(v) for v in q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def write_known_answer(root: Path, seed: int = 7) -> KnownAnswer:
    rng = np.random.default_rng(seed)
    cameras, skeleton = camera_constants()
    positions_3d: dict = {}
    positions_2d: dict = {}
    frame_errors: dict[str, list[tuple[int, float]]] = {}
    for subject, entries in KNOWN_ANSWER_ENTRIES.items():
        positions_3d[subject], positions_2d[subject] = {}, {}
        for entry, frames in entries.items():
            world = _random_world_motion(rng, frames)
            positions_3d[subject][entry] = world.astype(np.float32)
            views = []
            for cam_index, camera in enumerate(cameras[subject]):
                rotation = _rotation_matrix(camera.orientation.astype(np.float64))
                cam = (world[:, list(skeleton.kept_joints)] - camera.translation.astype(np.float64)) @ rotation
                relative = cam - cam[:, :1]
                extra = EXTRA_DETECTION_FRAMES[cam_index]
                normalised = np.concatenate([relative[:, :, :2], rng.uniform(-0.5, 0.5, (extra, 17, 2))])
                pixels = (normalised + [1.0, camera.res_h / camera.res_w]) * camera.res_w / 2
                views.append(pixels.astype(np.float32))
                depth_error = np.abs(relative[:, :, 2]).mean()  # root contributes 0 on both sides
                frame_errors.setdefault(entry.split(" ")[0], []).append((frames, float(depth_error)))
            positions_2d[subject][entry] = views
    data_dir = root / "data" / "human36m"
    data_dir.mkdir(parents=True)
    np.savez_compressed(data_dir / Path(POSITIONS_3D).name, positions_3d=positions_3d)
    metadata = {"layout_name": "h36m", "num_joints": 17, "keypoints_symmetry": [list(skeleton.left), list(skeleton.right)]}
    np.savez_compressed(data_dir / Path(DETECTIONS_2D).name, positions_2d=positions_2d, metadata=metadata)
    weights_dir = root / "weights" / "videopose3d"
    weights_dir.mkdir(parents=True)
    torch.save({"epoch": 80, "lr": 1e-3, "model_pos": oracle_state_dict(upstream_layout=True)}, weights_dir / "model_best.bin")
    per_action = {a: 1000.0 * sum(f * e for f, e in v) / sum(f for f, _ in v) for a, v in frame_errors.items()}
    expected = {"mpjpe_p1_mm": float(np.mean(list(per_action.values())))}
    expected.update({f"mpjpe_p1_mm/{a}": v for a, v in per_action.items()})
    return KnownAnswer(root / "data", root / "weights", expected, tolerance=0.01, profile="smoke")


def _random_world_motion(rng: np.random.Generator, frames: int) -> np.ndarray:
    """A body-sized point cloud drifting a few metres from the rig centre, in world metres."""
    body = rng.uniform(-0.4, 0.4, (32, 3)) + [0.0, 0.0, 0.9]
    sway = 0.05 * np.sin(np.linspace(0, 3, frames))[:, None, None] * rng.standard_normal((1, 32, 3))
    root = np.cumsum(rng.normal(0, 0.01, (frames, 1, 3)), axis=0) + [0.3, -0.2, 0.0]
    return body[None] + sway + root


def oracle_state_dict(upstream_layout: bool) -> dict[str, torch.Tensor]:
    """Weights under which the network's output at frame t is (x_j, y_j, 0) of its input frame t."""
    net = build_vp3d()
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    channels, features = 1024, 34
    bn_identity = math.sqrt(1 + 1e-5)  # cancels BatchNorm's 1/sqrt(var + eps) with var = 1
    for key in state:
        if key.endswith("running_var"):
            state[key] = torch.ones(channels)
    # Split every input coordinate into its positive and negative parts so the ReLUs keep both.
    centre_tap = torch.zeros(channels, features, 3, 1)
    for f in range(features):
        centre_tap[f, f, 1, 0] = 1.0
        centre_tap[features + f, f, 1, 0] = -1.0
    state["expand_conv.weight"] = centre_tap
    state["expand_bn.weight"] = torch.full((channels,), bn_identity)
    # Residual branches end in a BatchNorm with zero scale and shift, so each block passes its
    # (trimmed) input through and the temporal alignment of the real network is preserved.
    shrink = torch.zeros(51, channels, 1, 1)
    for joint in range(17):
        for coord in range(2):
            f = 2 * joint + coord
            shrink[3 * joint + coord, f, 0, 0] = 1.0
            shrink[3 * joint + coord, features + f, 0, 0] = -1.0
    state["shrink.weight"] = shrink
    if upstream_layout:
        state = {
            ("module." + k): (v.squeeze(-1) if _is_temporal_conv_weight(k) else v) for k, v in state.items()
        }
    return state


SLICE = VideoPose3DSlice()
