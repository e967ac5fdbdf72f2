"""DEKR pre/post-processing (spec §d, §e): goldens, the Ascend bucket rule and defined edge cases."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tooling.models.dekr import build_rescore
from tooling.models.dekr import processing as P
from tooling.seeded import apply_seeded_weights

pytestmark = [pytest.mark.dekr]

GOLDEN = Path(__file__).resolve().parents[3] / "fixtures" / "dekr" / "golden"
EXACT = {"rtol": 0, "atol": 0}


@pytest.fixture(scope="module")
def preprocess_golden() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "preprocess_public.npz"))


@pytest.fixture(scope="module")
def postprocess_golden() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "postprocess_public.npz"))


@pytest.fixture(scope="module")
def seeded_rescore() -> torch.nn.Module:
    return apply_seeded_weights(build_rescore())


@pytest.fixture(scope="module")
def golden_canvas(postprocess_golden: dict[str, np.ndarray]) -> P.CanvasPoses:
    g = postprocess_golden
    return P.decode_poses(g["heatmap"], g["offset"], g["heatmap_flip"], g["offset_flip"])


# --- preprocessing ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("length", "bucket"), [
    (64, 512), (512, 512), (576, 768), (640, 768), (704, 768), (768, 768),
    (832, 1024), (896, 1024), (960, 1024), (1024, 1024), (1088, 1024), (4096, 1024),
])
def test_bucket_rounds_up_to_the_next_canvas(length: int, bucket: int) -> None:
    assert P.bucket_length(length) == bucket


@pytest.mark.parity
def test_geometry_golden(preprocess_golden: dict[str, np.ndarray]) -> None:
    g = preprocess_golden
    for index, (width, height) in enumerate(g["sizes_wh"].tolist()):
        geometry = P.plan_input(width, height)
        short_side, long_side = sorted((width, height))
        unbucketed = P.unbucketed_long_side(short_side, long_side)
        assert geometry.bucket_wh == tuple(g["bucket_wh"][index]), (width, height)
        assert (unbucketed, 512)[:: 1 if width >= height else -1] == tuple(g["unbucketed_wh"][index])
        np.testing.assert_array_equal(geometry.center, g["center"][index])
        np.testing.assert_allclose(geometry.scale, g["scale"][index], rtol=1e-15)
        np.testing.assert_allclose(P.affine_matrix(geometry), g["affine_fwd"][index], rtol=0, atol=1e-9)
        np.testing.assert_allclose(P.affine_matrix(geometry, inverse=True), g["affine_inv"][index], rtol=0, atol=1e-9)


@pytest.mark.parity
def test_preprocess_golden(preprocess_golden: dict[str, np.ndarray]) -> None:
    g = preprocess_golden
    inputs = P.preprocess(g["example_image_rgb"])
    assert inputs.geometry.bucket_wh == (768, 512)
    np.testing.assert_array_equal(P.warp_to_canvas(g["example_image_rgb"], inputs.geometry), g["example_warped_rgb"])
    assert inputs.image.shape == inputs.flipped.shape == (1, 3, 512, 768)
    np.testing.assert_allclose(inputs.image[0, :, :2, :2].numpy(), g["example_image_corner_values"], **EXACT)
    np.testing.assert_allclose(inputs.flipped[0, :, :2, -4:].numpy(), g["example_flip_corner_values"], **EXACT)
    assert inputs.image.double().sum().item() == pytest.approx(float(g["example_input_sum"]), abs=1e-6)
    assert inputs.flipped.double().sum().item() == pytest.approx(float(g["example_flip_input_sum"]), abs=1e-6)


def test_preprocess_file_reads_rgb(preprocess_golden: dict[str, np.ndarray], tmp_path: Path) -> None:
    image_rgb = preprocess_golden["example_image_rgb"]
    path = tmp_path / "000000000001.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    from_file, in_memory = P.preprocess_file(path), P.preprocess(image_rgb)
    assert torch.equal(from_file.image, in_memory.image) and from_file.geometry == in_memory.geometry


def test_flipped_input_is_a_shifted_mirror_built_from_a_copy() -> None:
    image = torch.arange(2 * 8, dtype=torch.float32).view(1, 1, 2, 8)
    original = image.clone()
    flipped = P.flipped_input(image)
    mirrored = original.flip(-1)
    assert torch.equal(image, original)  # the input is not modified
    assert torch.equal(flipped[..., :-3], mirrored[..., 3:])
    assert torch.equal(flipped[..., -3:], mirrored[..., -3:])


def test_invalid_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        P.plan_input(0, 10)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        P.preprocess(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(1, 18, h, w\)"):
        P.decode_poses(np.zeros((1, 17, 4, 4)), np.zeros((1, 34, 4, 4)), np.zeros((1, 18, 4, 4)), np.zeros((1, 34, 4, 4)))


# --- postprocessing goldens ------------------------------------------------------------------------

@pytest.mark.parity
def test_decode_golden(golden_canvas: P.CanvasPoses, postprocess_golden: dict[str, np.ndarray]) -> None:
    g, canvas = postprocess_golden, golden_canvas
    np.testing.assert_array_equal(canvas.candidate_index.numpy(), g["center_candidates_index"])
    np.testing.assert_allclose(canvas.candidate_score.numpy(), g["center_candidates_score"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(canvas.poses_pre_nms[..., :2].numpy(), g["poses_pre_nms"][..., :2], rtol=0, atol=1e-3)
    np.testing.assert_allclose(canvas.poses_pre_nms[..., 2].numpy(), g["poses_pre_nms"][..., 2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(canvas.heat_values_pre_nms.numpy(), g["heatval_pre_nms"], rtol=0, atol=1e-5)
    assert canvas.keep == g["nms_keep"].tolist()
    np.testing.assert_allclose(canvas.poses[..., :2].numpy(), g["poses_nms"][..., :2], rtol=0, atol=1e-3)
    np.testing.assert_allclose(canvas.poses[..., 2].numpy(), g["poses_nms"][..., 2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(canvas.scores.numpy(), g["scores_nms"], rtol=0, atol=1e-5)


@pytest.mark.parity
def test_rescore_and_results_golden(
    golden_canvas: P.CanvasPoses, postprocess_golden: dict[str, np.ndarray], seeded_rescore: torch.nn.Module
) -> None:
    g = postprocess_golden
    geometry = P.plan_input(*g["image_wh"].tolist())
    assert geometry.bucket_wh == tuple(g["bucket_wh"])
    np.testing.assert_array_equal(geometry.center, g["center"])
    np.testing.assert_allclose(geometry.scale, g["scale"], rtol=1e-15)

    poses = P.to_image_coordinates(golden_canvas.poses, geometry)
    np.testing.assert_allclose(poses.numpy(), g["final_poses"], rtol=0, atol=1e-3)
    features = P.rescore_features(poses)
    np.testing.assert_allclose(features.numpy(), g["rescore_features"], rtol=0, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(seeded_rescore(features).numpy(), g["rescore_raw"], rtol=0, atol=1e-5)
    scores = P.rescore(poses, golden_canvas.scores, seeded_rescore)
    np.testing.assert_allclose(scores.numpy(), g["final_scores"], rtol=0, atol=1e-5)

    results = P.coco_results(poses, scores, P.image_id_from_file_name("000000000001.jpg"))
    assert [r["image_id"] for r in results] == [1] * len(results)
    assert {r["category_id"] for r in results} == {1}
    np.testing.assert_allclose([r["keypoints"] for r in results], g["json_keypoints"], rtol=0, atol=1e-3)
    np.testing.assert_allclose([r["score"] for r in results], g["json_score"], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["bbox"] for r in results], g["json_bbox"], rtol=0, atol=1e-3)


@pytest.mark.parity
def test_cocoeval_golden(
    postprocess_golden: dict[str, np.ndarray], seeded_rescore: torch.nn.Module, tmp_path: Path
) -> None:
    from tooling.coco.dataset import load_coco
    from tooling.coco.evaluation import evaluate_keypoints, write_results_json

    g = postprocess_golden
    (tmp_path / "gt.json").write_text(str(g["gt_json"]))
    coco_gt = load_coco(tmp_path / "gt.json")
    image = P.postprocess(
        (g["heatmap"], g["offset"]), (g["heatmap_flip"], g["offset_flip"]),
        P.plan_input(*g["image_wh"].tolist()), seeded_rescore,
    )
    for scores, expected in ((image.scores, "cocoeval_stats"), (image.pose_scores, "cocoeval_stats_pre_rescore")):
        path = write_results_json(P.coco_results(image.poses, scores, 1), tmp_path / f"{expected}.json")
        stats = evaluate_keypoints(coco_gt, path)
        np.testing.assert_allclose(list(stats.values()), g[expected], rtol=0, atol=1e-9, err_msg=expected)


# --- flip fusion -----------------------------------------------------------------------------------

def test_consistent_flip_outputs_fuse_to_the_plain_outputs() -> None:
    """A network that is exactly mirror-equivariant gives flipped outputs that fuse to no change."""
    generator = torch.Generator().manual_seed(0)
    height, width = 6, 10
    heatmap = torch.rand(18, height, width, generator=generator)
    poses = 20 * torch.rand(17, 2, height, width, generator=generator)
    grid = torch.stack(torch.meshgrid(torch.arange(float(width)), torch.arange(float(height)), indexing="xy"))
    mirrored = poses.flip(-1)[list(P.FLIP_INDEX)]
    poses_flip = torch.stack([width - 1 - mirrored[:, 0], mirrored[:, 1]], dim=1)
    heatmap_flip = heatmap.flip(-1)[list(P.FLIP_INDEX_WITH_CENTER)]

    fused_heatmap, fused_poses = P.fuse_flip(heatmap, (grid - poses).flatten(0, 1), heatmap_flip,
                                             (grid - poses_flip).flatten(0, 1))
    torch.testing.assert_close(fused_heatmap, heatmap)
    torch.testing.assert_close(fused_poses, poses, atol=1e-5, rtol=0)


def test_flip_index_swaps_left_and_right() -> None:
    from tooling.coco.keypoints import flip_permutation

    assert list(P.FLIP_INDEX) == flip_permutation().tolist()
    assert P.FLIP_INDEX_WITH_CENTER[-1] == 17


# --- centre candidates -----------------------------------------------------------------------------

def test_equal_candidates_are_ordered_by_flat_index() -> None:
    center = torch.zeros(8, 8)
    center[5, 1] = center[2, 3] = 0.5
    center[6, 6] = 0.9
    indices, scores = P.center_candidates(center)
    assert indices.tolist() == [6 * 8 + 6, 2 * 8 + 3, 5 * 8 + 1]
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.5])


def test_plateau_maxima_all_survive() -> None:
    center = torch.zeros(6, 6)
    center[3, 3] = center[3, 4] = 0.7
    indices, _ = P.center_candidates(center)
    assert indices.tolist() == [3 * 6 + 3, 3 * 6 + 4]


def test_ties_at_the_people_limit_keep_the_lowest_indices() -> None:
    center = torch.zeros(16, 16)
    center[::2, ::2] = 0.3  # 64 isolated equal peaks
    indices, _ = P.center_candidates(center)
    expected = sorted(r * 16 + c for r in range(0, 16, 2) for c in range(0, 16, 2))[: P.MAX_PEOPLE]
    assert indices.tolist() == expected


def test_candidate_threshold_is_strict() -> None:
    center = torch.zeros(6, 6)
    center[1, 1] = P.CENTER_THRESHOLD
    center[4, 4] = 0.011
    indices, _ = P.center_candidates(center)
    assert indices.tolist() == [4 * 6 + 4]


def test_no_candidates_gives_no_results(seeded_rescore: torch.nn.Module) -> None:
    zeros = np.zeros((1, 18, 8, 12), dtype=np.float32), np.zeros((1, 34, 8, 12), dtype=np.float32)
    image = P.postprocess(zeros, zeros, P.plan_input(48, 32), seeded_rescore)
    assert image.poses.shape == (0, 17, 3) and image.scores.shape == (0,)
    assert P.coco_results(image.poses, image.scores, 7) == []


# --- pose NMS --------------------------------------------------------------------------------------

def base_pose(seed: int = 0) -> torch.Tensor:
    return 100 * torch.rand(17, 2, generator=torch.Generator().manual_seed(seed))


def nms_radius(pose: torch.Tensor) -> float:
    extent = pose.amax(0) - pose.amin(0)
    return float(P.NMS_DISTANCE_RATIO * extent.pow(2).sum().sqrt())


def test_nms_keeps_the_best_heat_score_of_a_group() -> None:
    pose = base_pose()
    shift = torch.tensor([0.3 * nms_radius(pose), 0.0])
    far = pose + torch.tensor([500.0, 0.0])
    poses = torch.stack([pose, pose + shift, far])
    assert P.pose_nms(poses, torch.tensor([0.2, 0.5, 0.1])) == [1, 2]


def test_nms_skips_a_group_whose_best_pose_is_already_suppressed() -> None:
    pose = base_pose()
    step = torch.tensor([0.6 * nms_radius(pose), 0.0])
    # A~B and B~C are within the radius, A and C are not; B has the best heat score.
    poses = torch.stack([pose, pose + step, pose + 2 * step])
    assert P.pose_nms(poses, torch.tensor([0.1, 0.9, 0.2])) == [1]


def test_nms_needs_more_than_eight_close_joints() -> None:
    pose = base_pose()
    moved = pose.clone()
    moved[9:] += 50.0  # exactly 9 joints stay close -> suppressed
    assert P.pose_nms(torch.stack([pose, moved]), torch.tensor([0.5, 0.1])) == [0]
    moved[8] += 50.0  # 8 close joints -> separate people
    assert P.pose_nms(torch.stack([pose, moved]), torch.tensor([0.5, 0.1])) == [0, 1]


def test_pose_with_coinciding_joints_forms_its_own_group() -> None:
    point = torch.full((17, 2), 40.0)
    pose = base_pose()
    poses = torch.stack([point, pose, point.clone()])
    # Zero extent means zero radius: a degenerate pose suppresses nothing, not even its twin.
    assert P.pose_nms(poses, torch.tensor([0.3, 0.2, 0.9])) == [0, 1, 2]


def test_degenerate_pose_gets_finite_features_and_a_point_bbox(seeded_rescore: torch.nn.Module) -> None:
    poses = torch.cat([torch.full((1, 17, 2), 12.5), torch.full((1, 17, 1), 0.4)], dim=-1)
    features = P.rescore_features(poses)
    assert torch.isfinite(features).all()
    assert torch.equal(features[0, :57], torch.zeros(57))  # torso norm falls back to 1
    result = P.coco_results(poses, P.rescore(poses, torch.tensor([0.4]), seeded_rescore), 3)[0]
    assert result["bbox"] == [12.5, 12.5, 0.0, 0.0]


def test_nan_rescore_output_counts_as_zero() -> None:
    class NanNet(torch.nn.Module):
        def forward(self, feature: torch.Tensor) -> torch.Tensor:
            return torch.full((len(feature), 1), float("nan"))

    poses = torch.cat([base_pose().unsqueeze(0), torch.ones(1, 17, 1)], dim=-1)
    assert P.rescore(poses, torch.tensor([0.8]), NanNet()).tolist() == [0.0]


# --- results ---------------------------------------------------------------------------------------

def test_image_id_from_file_name() -> None:
    assert P.image_id_from_file_name("000000397133.jpg") == 397133
    assert P.image_id_from_file_name("data/coco/images/val2017/000000000139.jpg") == 139
    with pytest.raises(ValueError, match="000000397133.jpg"):
        P.image_id_from_file_name("cat.jpg")


def test_coco_results_layout() -> None:
    poses = torch.cat([base_pose().unsqueeze(0), torch.rand(1, 17, 1)], dim=-1)
    result = P.coco_results(poses, torch.tensor([0.25]), 42)[0]
    assert set(result) == {"image_id", "category_id", "keypoints", "score", "bbox"}
    assert result["keypoints"][:3] == pytest.approx(poses[0, 0].tolist())
    x, y = poses[0, :, 0].numpy(), poses[0, :, 1].numpy()
    assert result["bbox"] == pytest.approx([x.min(), y.min(), np.ptp(x), np.ptp(y)])
    json.dumps(result)  # plain Python types only
