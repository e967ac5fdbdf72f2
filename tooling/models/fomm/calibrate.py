"""FOMM's calibrated agreement weights: seeded networks with a few layers set in closed form, so
that on the agreement set's clips AKD is a few pixels and MKR strictly between 0 and 1 on every
backend, and a deployed backend that moves the reconstruction moves them.

The three networks, as written (``calibrate_agreement``):

- ``kp_detector``: seeded, its jacobian head answering the identity (weight 0, bias [1, 0, 0, 1]):
  each keypoint moves the frame by a translation. Seeded jacobians are nearly singular (det about
  -0.007), and the generator inverts the driving ones: the warp would leave the frame.
- ``generator``: its appearance path carries the source's red and green channels unchanged
  (identity taps in ``first``, the down and up blocks; their batch norms pass through; the
  bottleneck's residual branches silenced; the occlusion map a constant ``OCCLUSION``), so the
  decoder holds a 4x-downsampled copy of them warped by the seeded dense-motion network's mix of
  the keypoints' translations. ``final`` is the ridge readout (7x7 taps of those two channels) to
  the logits of the driving frames. Blue is guessed from red and green, so squares that differ in
  blue alone are confused: an imperfect reconstruction (L1 about 0.08) of a known kind.
- ``pose_estimator``: stage 6's heatmap branch passes the trunk's 128 features through (its 7x7
  convs and first 1x1 carry the trunk channels; earlier stages' maps are not read), and its last
  1x1 conv is the ridge readout from them to maps that are -1 everywhere and rise to +1 at a unit
  Gaussian (one heatmap cell) on each visible joint's square, found by colour as the synthetic
  set's pose stand-in finds them (synthetic.py). It is fitted on the agreement clips' frames and
  ``EXTRA_LAYOUTS`` more seeded frames of the same kind, each with its mirror, as the flip test
  feeds them. The -1 floor keeps a linear readout's residual under the 0.1 peak threshold.

Everything is deterministic (seeded weights, float64 normal equations). The checkpoints are half
precision, as the known-answer set's, but for the two fitted readouts (float32); the readouts are
fitted on the half-rounded networks, so what is saved is what was fitted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tooling.calibration import carry_channels, channels_last, pass_through_batchnorm, ridge_readout, set_conv1x1
from tooling.models.fomm.network import build_generator, build_kp_detector
from tooling.models.fomm.pose import network_input
from tooling.models.fomm.pose_estimator import HEATMAP_CHANNELS, PAF_CHANNELS, build_pose_estimator
from tooling.models.fomm.synthetic import ReconstructionOracles, draw_frame, joint_layout
from tooling.models.fomm.video import frames_to_input
from tooling.seeded import apply_seeded_weights

SALT = "agreement"
CARRIED = (0, 1)  # the generator's appearance path carries red and green
OCCLUSION_LOGIT = 8.0  # occlusion = sigmoid(8) everywhere: nothing occluded
FINAL_TAPS = 7  # the generator's ``final`` is a 7x7 conv
EXTRA_LAYOUTS = 8  # seeded frames of coloured squares the pose head is fitted on besides the set's
LAYOUT_SEED = 5
POSE_FLOOR = -1.0
RIDGE = 1e-3


def half_rounded(network: torch.nn.Module) -> torch.nn.Module:
    """The network as its half-precision checkpoint loads it (float32 values of half precision)."""
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return network


@torch.no_grad()
def keypoint_detector() -> torch.nn.Module:
    detector = apply_seeded_weights(build_kp_detector(), SALT)
    detector.jacobian.weight.zero_()
    detector.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(detector.num_kp))
    return half_rounded(detector)


@torch.no_grad()
def appearance_generator() -> torch.nn.Module:
    """The generator before its readout: the carried channels reach ``final`` unchanged but for
    the pooling, the warp and the nearest upsampling."""
    generator = apply_seeded_weights(build_generator(), SALT)
    for block in (generator.first, *generator.down_blocks, *generator.up_blocks):
        carry_channels(block.conv, CARRIED)
        pass_through_batchnorm(block.norm)
    for block in generator.bottleneck:
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    occlusion = generator.dense_motion_network.occlusion
    occlusion.weight.zero_()
    occlusion.bias.fill_(OCCLUSION_LOGIT)
    return half_rounded(generator)


@torch.no_grad()
def fit_generator_readout(generator: torch.nn.Module, detector: torch.nn.Module, clips: list[np.ndarray]) -> None:
    """``final`` = ridge readout from the carried channels' 7x7 neighbourhoods to the logits of
    each clip's frames, reconstructed as the pass does (source frame 0, every frame driving)."""
    features, targets = [], []
    hook = generator.final.register_forward_hook(lambda module, args, out: features.append(args[0][:, list(CARRIED)]))
    try:
        for frames in clips:
            inputs = torch.from_numpy(frames_to_input(frames))
            source = detector(inputs[:1])
            for t in range(len(inputs)):
                driving = detector(inputs[t : t + 1])
                generator(inputs[:1], driving["value"], driving["jacobian"], source["value"], source["jacobian"])
            targets.append(inputs.numpy())
    finally:
        hook.remove()
    columns = F.unfold(torch.cat(features), FINAL_TAPS, padding=FINAL_TAPS // 2)  # (N, C*49, H*W)
    design = columns.permute(0, 2, 1).reshape(-1, columns.shape[1]).double().numpy()
    frames = np.concatenate(targets).clip(0.5 / 255, 1 - 0.5 / 255)
    logits = np.log(frames / (1 - frames)).transpose(0, 2, 3, 1).reshape(-1, frames.shape[1])
    weight, bias = ridge_readout(design, logits, ridge=RIDGE)
    generator.final.weight.zero_()
    generator.final.weight[:, list(CARRIED)] = torch.from_numpy(
        weight.reshape(len(bias), len(CARRIED), FINAL_TAPS, FINAL_TAPS)).to(generator.final.weight.dtype)
    generator.final.bias.copy_(torch.from_numpy(bias))


def pose_inputs(frames_rgb: list[np.ndarray], box: int) -> np.ndarray:
    """The pose network's inputs for each frame and its mirror, as the flip test makes them."""
    inputs = []
    for frame in frames_rgb:
        bgr = np.ascontiguousarray(frame[..., ::-1])
        for image in (bgr, np.ascontiguousarray(bgr[:, ::-1])):
            inputs.append(network_input(image, box)[0])
    return np.concatenate(inputs)


@torch.no_grad()
def pose_estimator(frames_rgb: list[np.ndarray], box: int) -> torch.nn.Module:
    """Stage 6's heatmap branch carries the trunk features to its readout, fitted on
    ``frames_rgb`` and the seeded extra layouts (see the module docstring)."""
    network = apply_seeded_weights(build_pose_estimator(), SALT)
    branch = [m for m in network.model6_2 if isinstance(m, torch.nn.Conv2d)]
    trunk_channels = branch[0].in_channels - PAF_CHANNELS - HEATMAP_CHANNELS
    carry_channels(branch[0], range(trunk_channels), in_offset=PAF_CHANNELS + HEATMAP_CHANNELS)
    for conv in branch[1:-1]:
        carry_channels(conv, range(trunk_channels))
    half_rounded(network)
    size = frames_rgb[0].shape[0]
    rng = np.random.default_rng(LAYOUT_SEED)
    extra = [draw_frame(size, joint_layout(size, rng)) for _ in range(EXTRA_LAYOUTS)]
    inputs = pose_inputs(list(frames_rgb) + extra, box)
    visible = np.concatenate([ReconstructionOracles.pose_estimator({"input": i[None]})["heatmap"] for i in inputs])
    targets = POSE_FLOOR + (1 - POSE_FLOOR) * visible
    features = []
    hook = branch[-1].register_forward_hook(lambda module, args, out: features.append(args[0]))
    try:
        network(torch.from_numpy(inputs))
    finally:
        hook.remove()
    weight, bias = ridge_readout(channels_last(features[0]), targets.transpose(0, 2, 3, 1).reshape(-1, targets.shape[1]),
                                 ridge=RIDGE)
    set_conv1x1(branch[-1], weight, bias)
    return network


def half_state(network: torch.nn.Module, fitted: str) -> dict[str, torch.Tensor]:
    """The state to save: half precision but for the fitted readout (module ``fitted``)."""
    return {k: v.half() if v.is_floating_point() and not k.startswith(f"{fitted}.") else v
            for k, v in network.state_dict().items()}


def write_calibrated(clips: list[np.ndarray], box: int, folder: Path, generator_file: str, pose_file: str) -> None:
    """The three calibrated networks for ``clips`` (uint8 RGB frames each), saved under ``folder``
    in the staged layout (the generator checkpoint holds the detector too)."""
    detector = keypoint_detector()
    generator = appearance_generator()
    fit_generator_readout(generator, detector, clips)
    pose = pose_estimator([frame for frames in clips for frame in frames], box)
    folder.mkdir(parents=True)
    torch.save({"kp_detector": half_state(detector, "jacobian"), "generator": half_state(generator, "final")},
               folder / generator_file)
    torch.save(half_state(pose, f"model6_2.{len(pose.model6_2) - 1}"), folder / pose_file)
