"""GMA as the engine sees it: export variants, flow decoding, Sintel accuracy, known answer."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from tooling.model_spec import FIXTURES_DIR
from tooling.models.gma.flo import read_flo
from tooling.models.gma.known_answer import write_warped_sintel
from tooling.models.gma.metric import FlowErrorTotals, endpoint_error
from tooling.models.gma.network import DEFAULT_ITERS, INPUT_NAMES, OUTPUT_NAME, STRIDE, build_gma
from tooling.models.gma.padding import InputPadder
from tooling.models.gma.sintel import DATA, PASSES, SintelPair, read_frame, sintel_pairs
from tooling.pictures import as_image, flow_colour, heat, panel
from tooling.seeded import apply_seeded_weights
from tooling.slice import AccuracyContext, KnownAnswer, ModelSlice, PassSample

CHECKPOINT = "gma-sintel.pth"
# The namespace the guide's export script builds the model from (spec §1); everything else is
# upstream's default (dropout absent -> 0, corr levels 4 and radius 4 set by the model).
UPSTREAM_ARGS = {"num_heads": 1, "position_only": False, "position_and_content": False, "mixed_precision": False}
# How the correlation lookup reaches each backend (yaml variants): F.grid_sample (ONNX
# GridSample, opset 16+) or the guide's gather-based sampler (opset 12, for ATC).
VARIANT_SAMPLERS = {"grid_sample": "grid_sample", "gather": "gather"}
PERCENT = 100.0


class GmaSlice(ModelSlice):
    name = "gma"

    def build_network(self, network: str, variant: str = "grid_sample") -> torch.nn.Module:
        if network != "gma":
            raise KeyError(f"gma has no network {network!r}")
        if variant not in VARIANT_SAMPLERS:
            raise KeyError(f"gma has no export variant {variant!r}; known: {sorted(VARIANT_SAMPLERS)}")
        return build_gma(VARIANT_SAMPLERS[variant])

    def build_upstream_network(self, network: str, checkout) -> torch.nn.Module:
        """Upstream's ``RAFTGMA`` (core/network.py, unpatched: grid_sample and einsums) with the
        guide's arguments, answering as the export does: the final upsampled flow after 6
        iterations (upstream's test_mode returns the low-resolution flow too)."""
        if network != "gma":
            raise KeyError(f"no upstream builder for gma network {network!r}")
        model = checkout.import_module("network", subdir="core").RAFTGMA(argparse.Namespace(**UPSTREAM_ARGS)).eval()
        upstream_forward = model.forward

        def final_flow(image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
            return upstream_forward(image1, image2, iters=DEFAULT_ITERS, test_mode=True)[1]

        model.forward = final_flow  # an attribute, not a wrapper module: the state_dict keys stay upstream's
        return model

    def example_inputs(self, spec, network: str, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Two related frames in 0..255: the second a shifted, noisier copy of the first, so the
        parity gates see a flow with structure rather than two unrelated noise images."""
        rng = np.random.default_rng(seed)
        shape = (dims["batch"], 3, dims["height"], dims["width"])
        base = rng.uniform(0, 255, (shape[0], shape[1], shape[2] + 8, shape[3] + 8)).astype(np.float32)
        image1 = base[..., 4:-4, 4:-4]
        image2 = base[..., 2 : shape[2] + 2, 5 : shape[3] + 5] + rng.normal(0, 4, shape).astype(np.float32)
        return {"image1": np.ascontiguousarray(image1), "image2": np.clip(image2, 0, 255).astype(np.float32)}

    def decode(self, network: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        """The flow in pixels is the network's output itself (no normalisation to undo); its
        per-pixel magnitude is what the 1/3/5 px thresholds act on."""
        flow = np.asarray(outputs[OUTPUT_NAME], np.float32)
        return {"flow_px": flow, "flow_magnitude_px": np.sqrt((flow**2).sum(axis=1))}

    def disagreement_picture(self, network, feeds, reference, actual):
        """The first frame, torch eager's and the backend's flow on one colour scale, and the
        end-point error between the two flows."""
        torch_flow, backend_flow = (np.asarray(o[OUTPUT_NAME][0], np.float64) for o in (reference, actual))
        scale = float(np.sqrt((torch_flow**2).sum(axis=0)).max()) or 1.0
        epe = np.sqrt(((backend_flow - torch_flow) ** 2).sum(axis=0))
        return panel([("frame 1", as_image(feeds[INPUT_NAMES[0]][0])), ("torch eager flow", flow_colour(torch_flow, scale)),
                      ("backend flow", flow_colour(backend_flow, scale)), heat(epe, "EPE torch vs backend")],
                     footer=f"flow colours share one scale ({scale:.3g} px = full brightness); mean EPE {epe.mean():.3g} px")

    def sample_figures(self, record) -> dict[str, float]:
        """Per pair: its mean end-point error and 1 px accuracy (the pass's figures, one pair)."""
        pixels = float(record["pixels"])
        return {"epe": float(record["epe_sum"]) / pixels, "1px": 100.0 * float(record["below_1"]) / pixels}

    def golden_inputs(self, spec, network: str, path: Path, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The full-size golden stores no inputs, only their sums: rebuild them from the two real
        frames in fixtures/ by the spec's recipe (replicate-pad 436 -> 440) and check the sums."""
        if not all(f"{name}_sum" in data for name in INPUT_NAMES):
            return super().golden_inputs(spec, network, path, data)
        feeds = {}
        for name, file in zip(INPUT_NAMES, ("frame_0047.png", "frame_0048.png")):
            frame = read_frame(FIXTURES_DIR / self.name / "frames" / file)
            image = InputPadder(*frame.shape[-2:]).pad(frame)[None]
            expected = float(data[f"{name}_sum"])
            if float(image.sum(dtype=np.float64)) != expected:
                raise ValueError(f"{path}: {name} rebuilt from {file} sums to {image.sum(dtype=np.float64)}, "
                                 f"the golden says {expected}")
            feeds[name] = image
        return feeds

    accuracy_unit = "pairs"

    def accuracy_samples(self, ctx: AccuracyContext) -> list[PassSample]:
        """Every pair of each pass (clean, then final); ``limit`` keeps the first N of each."""
        flow_dir = ctx.data_paths[DATA["flow"]]
        return [PassSample(f"{pass_name}/{pair.scene}/{pair.frame1.stem}", (pass_name, pair))
                for pass_name in PASSES for pair in sintel_pairs(ctx.data_paths[DATA[pass_name]], flow_dir)[: ctx.limit]]

    def score_sample(self, ctx: AccuracyContext, sample: PassSample, advance) -> dict[str, np.ndarray]:
        return _score_pair(ctx, sample.item[1])

    def merge_records(self, ctx: AccuracyContext, samples: list[PassSample], records) -> dict[str, float]:
        """EPE and 1/3/5 px accuracy (percent of all pixels of all pairs) per pass: pixel totals
        summed over the pass's pairs."""
        metrics: dict[str, float] = {}
        for pass_name in PASSES:
            totals, pairs = FlowErrorTotals(), 0
            for sample, record in zip(samples, records):
                if sample.item[0] == pass_name:
                    totals.add(record)
                    pairs += 1
            summary = totals.summary()
            metrics[f"{pass_name}_epe"] = summary["epe"]
            metrics.update({f"{pass_name}_{k}": PERCENT * v for k, v in summary.items() if k != "epe"})
            metrics[f"{pass_name}_pairs"] = float(pairs)
        return metrics

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """Real frames warped by known affine motions, scored through an oracle that answers each
        pair with its ground-truth flow (padding rows filled with junk the unpad must drop):
        reader, padding, enumeration and metric must all be exact for EPE 0 and 100 % within 1 px.
        The checkpoint (seeded, DataParallel ``module.`` keys) serves runs with the real network."""
        data_root, weights_root = root / "data", root / "weights"
        flows = write_warped_sintel(data_root, FIXTURES_DIR / self.name / "frames")
        state = apply_seeded_weights(build_gma(), "known-answer").state_dict()
        (weights_root / self.name).mkdir(parents=True)
        torch.save({f"module.{k}": v for k, v in state.items()}, weights_root / self.name / CHECKPOINT)
        oracle = GroundTruthFlowOracle(data_root)
        expected = {}
        for pass_name in PASSES:
            expected.update({f"{pass_name}_epe": 0.0, f"{pass_name}_1px": PERCENT, f"{pass_name}_3px": PERCENT,
                             f"{pass_name}_5px": PERCENT, f"{pass_name}_pairs": float(len(flows[pass_name]))})
        return KnownAnswer(data_root, weights_root, expected, tolerance=1e-9, profile="smoke",
                           oracles={"gma": oracle})

    calibrates_agreement = True

    @torch.no_grad()
    def calibrate_agreement(
        self, answer: KnownAnswer, samples: int, weights_root: Path, dims: dict[str, int]
    ) -> None:
        """Seeded weights (salt ``agreement``) whose flow head answers the set's mean motion, so
        that the 1/3/5 px shares on the first ``samples`` pairs of each pass sit strictly between
        0 and 100 %: the head's last conv keeps ``FLOW_HEAD_SCALE`` of its seeded weights, and its
        bias is the dominant motion (``dominant_motion``) of the flow those pairs lack after that
        network's six iterations, spread over the iterations (in feature-grid units). The affine
        motions vary over each frame and between pairs, so that flow is within 1 px on part of
        the pixels only."""
        network = apply_seeded_weights(build_gma(), "agreement")
        head = network.update_block.flow_head.conv2
        head.weight.mul_(FLOW_HEAD_SCALE)
        head.bias.zero_()
        missing = []
        for pass_name in PASSES:
            for pair in sintel_pairs(answer.data_root / DATA[pass_name], answer.data_root / DATA["flow"])[:samples]:
                image1, image2 = read_frame(pair.frame1), read_frame(pair.frame2)
                padder = InputPadder(*image1.shape[-2:])
                flow = network(torch.from_numpy(padder.pad(image1)[None]), torch.from_numpy(padder.pad(image2)[None]))
                missing.append((read_flo(pair.flow) - padder.unpad(flow[0].numpy()).transpose(1, 2, 0)).reshape(-1, 2))
        head.bias.copy_(torch.from_numpy(dominant_motion(np.concatenate(missing)) / (STRIDE * network.iters)))
        (weights_root / self.name).mkdir(parents=True)
        torch.save({f"module.{k}": v for k, v in network.state_dict().items()}, weights_root / self.name / CHECKPOINT)


# The flow head's last conv keeps this share of its seeded weights: the update still depends on
# the frames, but by a fraction of a pixel, so the fitted bias carries the set's mean motion.
FLOW_HEAD_SCALE = 0.01


def dominant_motion(flows: np.ndarray, step: int = 64) -> np.ndarray:
    """The (2,) flow vector within 1 px of the most of ``flows`` (N, 2), among every ``step``-th
    of them: the motion a constant flow field gets right on the largest share of pixels."""
    candidates = flows[::step]
    within = [(np.hypot(*(flows - c).T) < 1.0).sum() for c in candidates]
    return candidates[int(np.argmax(within))].astype(np.float64)


def _score_pair(ctx: AccuracyContext, pair: SintelPair) -> dict[str, np.ndarray]:
    image1, image2 = read_frame(pair.frame1), read_frame(pair.frame2)
    ground_truth = read_flo(pair.flow)
    padder = InputPadder(*image1.shape[-2:])
    if image2.shape != image1.shape or ground_truth.shape[:2] != image1.shape[-2:]:
        raise ValueError(f"{pair.frame1}: frames {image1.shape} / {image2.shape} and flow {pair.flow} "
                         f"{ground_truth.shape} differ in size")
    outputs = ctx.run("gma", {"image1": padder.pad(image1)[None], "image2": padder.pad(image2)[None]})
    flow = padder.unpad(outputs[OUTPUT_NAME][0])
    return FlowErrorTotals.record(endpoint_error(flow, ground_truth))


def _fingerprint(*arrays: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.digest()


class GroundTruthFlowOracle:
    """Answers each padded frame pair of a staged Sintel-format set with its ground-truth flow,
    padded, with the padding filled with a value far off any flow (must be cropped away)."""

    PADDING_JUNK = 1000.0

    def __init__(self, data_root: Path):
        self._answers: dict[bytes, np.ndarray] = {}
        for pass_name in PASSES:
            for pair in sintel_pairs(data_root / DATA[pass_name], data_root / DATA["flow"]):
                image1, image2 = read_frame(pair.frame1), read_frame(pair.frame2)
                padder = InputPadder(*image1.shape[-2:])
                flow = read_flo(pair.flow).transpose(2, 0, 1)
                padded = np.full((2, *padder.padded_shape), self.PADDING_JUNK, np.float32)
                left, _, top, _ = padder.pads
                padded[:, top : top + flow.shape[1], left : left + flow.shape[2]] = flow
                self._answers[_fingerprint(padder.pad(image1), padder.pad(image2))] = padded

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        flows = []
        for image1, image2 in zip(feeds["image1"], feeds["image2"]):
            key = _fingerprint(image1, image2)
            if key not in self._answers:
                raise KeyError("the oracle was given a frame pair it did not prepare: the pipeline fed something unexpected")
            flows.append(self._answers[key])
        return {OUTPUT_NAME: np.stack(flows)}


SLICE = GmaSlice()
