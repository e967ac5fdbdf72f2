"""FOMM's own pieces: anti-aliasing kernel, pose postprocessing and AKD/MKR goldens, known shifts,
clip readers, and the exported generator graphs (no Inverse op, opset-11 gather sampler on ORT)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tooling.backends.onnx_rewrites import int64_to_int32
from tooling.export import export_onnx
from tooling.model_spec import FIXTURES_DIR
from tooling.models.fomm.metric import FrameKeypoints, PairingError, akd_mkr
from tooling.models.fomm.network import AntiAliasInterpolation2d, build_generator, gather_grid_sample
from tooling.models.fomm.pose import find_keypoints, frame_keypoints, fuse_heatmaps, fuse_pafs, network_input, to_frame_size
from tooling.models.fomm.synthetic import ReconstructionOracles, draw_frame, joint_layout
from tooling.models.fomm.video import read_clip, save_reconstruction, write_mp4
from tooling.seeded import apply_seeded_weights

GOLDEN = FIXTURES_DIR / "fomm" / "golden"
GENERATOR_INPUTS = ["source_imgs", "kp_driving_value", "kp_driving_jac", "kp_source_value", "kp_source_jac"]
GENERATOR_OUTPUTS = ["mask", "sparse_deformed", "occlusion_map", "deformed", "prediction"]


def test_antialias_kernel_golden():
    data = np.load(GOLDEN / "antialias_kernel.npz")
    module = AntiAliasInterpolation2d(3, 0.25)
    np.testing.assert_allclose(module.weight.numpy(), data["weight"], atol=1e-7)
    np.testing.assert_allclose(module(torch.from_numpy(data["input"])).numpy(), data["output"], atol=1e-5)


def test_pose_postprocess_golden():
    data = np.load(GOLDEN / "postprocess_public.npz")
    tensor, resized = network_input(np.ascontiguousarray(data["pose_frame_rgb"][..., ::-1]))
    np.testing.assert_allclose(tensor, data["pose_net_input"], atol=1e-6)
    size = (256, 256)
    plain = to_frame_size(data["heatmap"][0], resized, size)
    fused = fuse_heatmaps(plain, to_frame_size(data["heatmap_flip"][0], resized, size))
    np.testing.assert_allclose(fused[..., :2], data["fused_heatmap_ch01"][0], atol=1e-5)
    paf = fuse_pafs(to_frame_size(data["paf"][0], resized, size), to_frame_size(data["paf_flip"][0], resized, size))
    np.testing.assert_allclose(paf[..., :1], data["fused_paf_ch0"][0], atol=1e-5)
    for k in range(3):
        maps = [to_frame_size(data[name][k], resized, size) for name in ("heatmap", "heatmap_flip")]
        np.testing.assert_array_equal(find_keypoints(fuse_heatmaps(*maps)), data["keypoints"][k])


def _rows(data, suffix: str, key: str) -> list[FrameKeypoints]:
    names = ["vidA", "vidB"]
    return [FrameKeypoints(names[v] + suffix, int(f), k)
            for v, f, k in zip(data["akd_video_index"], data["akd_frame_number"], data[key])]


def test_akd_mkr_golden_with_shuffled_generated_rows():
    data = np.load(GOLDEN / "postprocess_public.npz")
    generated = _rows(data, ".mp4.png", "akd_gen_keypoints")
    order = np.random.default_rng(0).permutation(len(generated))
    scores = akd_mkr(_rows(data, ".mp4", "akd_gt_keypoints"), [generated[i] for i in order])
    assert scores["AKD"] == pytest.approx(float(data["AKD"]), rel=1e-12)
    assert scores["MKR"] == pytest.approx(float(data["MKR"]), rel=1e-12)


def test_identical_keypoints_and_a_known_shift():
    rng = np.random.default_rng(1)
    gt = [FrameKeypoints("a.mp4", t, rng.integers(0, 256, (18, 2)).astype(float)) for t in range(4)]
    gt[1].keypoints[[3, 9]] = -1
    same = [FrameKeypoints("a.mp4.png", r.frame_number, r.keypoints.copy()) for r in gt]
    assert akd_mkr(gt, same)["AKD"] == 0.0 and akd_mkr(gt, same)["MKR"] == 0.0
    shifted = [FrameKeypoints(r.file_name, r.frame_number, np.where(r.keypoints == -1, -1, r.keypoints + [3, -5]))
               for r in same]
    assert akd_mkr(gt, shifted)["AKD"] == pytest.approx(4.0)  # (|3| + |-5|) / 2
    shifted[2].keypoints[:9] = -1  # the generator loses half the joints of one frame
    assert akd_mkr(gt, shifted)["MKR"] == pytest.approx(0.5 / 4)


def test_pairing_errors_name_the_rows():
    row = FrameKeypoints("a.mp4", 0, np.zeros((18, 2)))
    with pytest.raises(PairingError, match="1 ground-truth frames but 0"):
        akd_mkr([row], [])
    with pytest.raises(PairingError, match="a.mp4#0 vs generated b.mp4.png#0"):
        akd_mkr([row], [FrameKeypoints("b.mp4.png", 0, np.zeros((18, 2)))])


def test_known_shift_through_the_pose_pipeline():
    """Squares away from the border, box = frame size: the whole keypoint path (resize, flip test,
    cubic resizes, fusion, peaks) puts each joint on its square's centre, and moving the squares
    by 8 px gives AKD 8 exactly."""
    layout = np.rint(joint_layout(128, np.random.default_rng(2))) + 64  # centred in a 256 frame
    base = frame_keypoints(draw_frame(256, layout), ReconstructionOracles.pose_estimator, 256)
    np.testing.assert_array_equal(base, layout)
    moved = frame_keypoints(draw_frame(256, layout + 8), ReconstructionOracles.pose_estimator, 256)
    scores = akd_mkr([FrameKeypoints("a.mp4", 0, base)], [FrameKeypoints("a.mp4.png", 0, moved)])
    assert (scores["AKD"], scores["MKR"]) == (8.0, 0.0)


def test_clip_readers_and_reconstruction_round_trip(tmp_path):
    frames = np.stack([draw_frame(128, joint_layout(128, np.random.default_rng(t))) for t in range(3)])
    write_mp4(tmp_path / "c.mp4", frames)
    decoded = read_clip(tmp_path / "c.mp4")
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 8
    predictions = (frames.transpose(0, 3, 1, 2).astype(np.float32) + 0.5) / 255
    saved = save_reconstruction(tmp_path / "png", tmp_path / "c.mp4", predictions)
    assert saved.name == "c.mp4.png"
    np.testing.assert_array_equal(read_clip(saved), frames)


def test_gather_sampler_matches_grid_sample_far_outside_too():
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.standard_normal((2, 3, 9, 11)).astype(np.float32))
    grid = torch.from_numpy(rng.uniform(-1.3, 1.3, (2, 5, 7, 2)).astype(np.float32))
    grid[0, 0, 0] = torch.tensor([1e9, -1e9])
    for align in (True, False):
        expected = torch.nn.functional.grid_sample(image, grid, align_corners=align)
        np.testing.assert_allclose(gather_grid_sample(image, grid, align).numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(("sampler", "opset"), [("gather", 11), ("grid_sample", 16)])
def test_exported_generator_has_no_inverse_and_runs_on_ort(tmp_path, sampler, opset):
    """128x128 generator per export variant: no matrix-inverse op, no int64 Clip; the opset-11
    gather graph also survives the 310P int64 -> int32 rewrite with the same outputs."""
    model = apply_seeded_weights(build_generator(sampler))
    data = np.load(GOLDEN / "generator_public.npz")
    feeds = {n: data[n] for n in GENERATOR_INPUTS}
    feeds["source_imgs"] = np.ascontiguousarray(feeds["source_imgs"][:, :, ::2, ::2])
    path = tmp_path / "generator.onnx"
    export_onnx(model, feeds, GENERATOR_OUTPUTS, path, exporter="torchscript", opset=opset)
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Inverse", "Det"}, ops
    assert ("GatherElements" in ops) == (sampler == "gather") and ("GridSample" in ops) == (sampler == "grid_sample")
    with torch.no_grad():
        expected = model(*(torch.from_numpy(feeds[n]) for n in GENERATOR_INPUTS))
    graphs = [graph] + ([int64_to_int32(graph)] if sampler == "gather" else [])
    for candidate in graphs:
        session = onnxruntime.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
        actual = dict(zip(GENERATOR_OUTPUTS, session.run(None, feeds)))
        for name in GENERATOR_OUTPUTS:
            atol = 1e-3 if name == "deformed" else 1e-4
            np.testing.assert_allclose(actual[name], expected[name].numpy(), atol=atol, err_msg=name)


def test_known_answer_checkpoints_load_strictly(tmp_path):
    """The staged files follow the real layouts: taichi-cpk.pth.tar holds a kp_detector and a
    generator entry, pose_model.pth a bare state dict; all load strictly through the engine."""
    from tooling.models.fomm import SLICE
    from tooling.models.fomm.pose_estimator import build_pose_estimator
    from tooling.models.fomm.network import build_kp_detector
    from tooling.baseline import load_model_spec
    from tooling.weights import WeightsChoice, apply_weights

    answer = SLICE.make_known_answer(tmp_path)
    spec = load_model_spec("fomm")
    for network, build in (("kp_detector", build_kp_detector), ("generator", build_generator),
                           ("pose_estimator", build_pose_estimator)):
        path = answer.weights_root / "fomm" / spec.networks[network].checkpoint_files[0]
        model = build()
        apply_weights(model, WeightsChoice(path), SLICE, network, spec.networks[network].checkpoint_keys)
        reference = apply_seeded_weights(build(), "known-answer").state_dict()
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, reference[key].half().float(), msg=f"{network}.{key}")
