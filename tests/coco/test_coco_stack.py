"""The model-agnostic COCO keypoint stack: geometry, decoding, NMS, results files, COCOeval, the
synthetic dataset, and known-answer runs of the whole top-down pipeline."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO

from tooling.coco.dataset import CocoKeypointDataset, load_coco
from tooling.coco.evaluation import (
    KEYPOINT_STAT_NAMES,
    evaluate_keypoints,
    first_image_ids,
    write_results_json,
)
from tooling.coco.pipeline import TopDownProgress, evaluate_topdown, predict_topdown
from tooling.coco.synthetic import (
    GroundTruthHeatmapOracle,
    perfect_precision_ap,
    write_synthetic_coco,
)
from tooling.coco.topdown import (
    TopDownConfig,
    box_to_center_scale,
    build_topdown_samples,
    clean_box,
    decode_heatmaps,
    oks_nms,
    rescore,
)
from tooling.coco.transforms import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    affine_transform_points,
    get_affine_transform,
    normalize_rgb,
)

CONFIG = TopDownConfig()
ALL_STATS_PERFECT = dict.fromkeys(KEYPOINT_STAT_NAMES, 1.0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> CocoKeypointDataset:
    return write_synthetic_coco(tmp_path_factory.mktemp("synthetic") / "coco", seed=0)


def _gaussian_maps(peaks: list[tuple[float, float]], size: tuple[int, int] = (48, 64),
                   sigma: float = 2.0) -> np.ndarray:
    width, height = size
    grid_y, grid_x = np.mgrid[0:height, 0:width]
    maps = [np.exp(-((grid_x - x) ** 2 + (grid_y - y) ** 2) / (2 * sigma ** 2)) for x, y in peaks]
    return np.stack(maps)[None].astype(np.float32)


def _gt_as_results(coco: Any, image_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """Every evaluable GT person as a detection with score 1."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_ids or [], iscrowd=False))
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in annotations if a["num_keypoints"] > 0]


# --- geometry -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size_minus_one", [True, False])
def test_affine_forward_and_inverse_are_inverse_maps(size_minus_one: bool) -> None:
    center, scale = np.array([130.5, 77.25]), np.array([0.9, 1.2])
    forward = get_affine_transform(center, scale, (48, 64), size_minus_one=size_minus_one)
    inverse = get_affine_transform(center, scale, (48, 64), size_minus_one=size_minus_one,
                                   inverse=True)
    points = np.array([[0.0, 0.0], [47.0, 63.0], [12.3, 40.9]])
    np.testing.assert_allclose(affine_transform_points(affine_transform_points(points, inverse),
                                                       forward), points, atol=1e-4)


def test_pixel_conventions_place_the_box_edges() -> None:
    center, scale = np.array([100.0, 80.0]), np.array([0.5, 0.5])  # a 100 px wide box
    unbiased = get_affine_transform(center, scale, (192, 256), size_minus_one=True)
    centre_and_edges = np.array([[100.0, 80.0], [50.5, 80.0], [149.5, 80.0]])
    edges = affine_transform_points(centre_and_edges, unbiased)
    np.testing.assert_allclose(edges, [[95.5, 127.5], [0.0, 127.5], [191.0, 127.5]], atol=1e-3)
    classic = get_affine_transform(center, scale, (192, 256), size_minus_one=False)
    edges = affine_transform_points(np.array([[100.0, 80.0], [50.0, 80.0], [150.0, 80.0]]), classic)
    np.testing.assert_allclose(edges, [[96.0, 128.0], [0.0, 128.0], [192.0, 128.0]], atol=1e-3)


def test_normalize_rgb_is_channel_first_imagenet() -> None:
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0] = 255
    normalised = normalize_rgb(image)
    assert normalised.shape == (3, 2, 3) and normalised.dtype == np.float32
    np.testing.assert_allclose(normalised[:, 0, 0], (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN_RGB)
                               / IMAGENET_STD_RGB, rtol=1e-6)


def test_clean_box_clips_and_rejects() -> None:
    assert clean_box([-5, 10, 20, 30], 100, 50) == (0.0, 10.0, 20.0, 30.0)
    assert clean_box([90, 40, 20, 30], 100, 50) == (90.0, 40.0, 10.0, 10.0)
    assert clean_box([150, 10, 20, 30], 100, 50) is None


def test_center_scale_pads_to_the_aspect_ratio() -> None:
    center, scale = box_to_center_scale((10.0, 20.0, 150.0, 100.0), CONFIG)
    np.testing.assert_array_equal(center, [84.5, 69.5])  # (w-1)/2 convention
    np.testing.assert_allclose(scale, [150 / 200 * 1.25, 200 / 200 * 1.25], rtol=1e-6)


def test_sample_list_keeps_only_evaluable_people(tmp_path: Path) -> None:
    person = {"category_id": 1, "iscrowd": 0, "area": 100.0, "num_keypoints": 1,
              "keypoints": [5, 5, 2] + [0] * 48}
    annotations = [
        {**person, "id": 1, "image_id": 7, "bbox": [0, 0, 10, 10]},
        {**person, "id": 2, "image_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1},
        {**person, "id": 3, "image_id": 7, "bbox": [0, 0, 10, 10], "keypoints": [0] * 51},
        {**person, "id": 4, "image_id": 7, "bbox": [0, 0, 10, 10], "category_id": 2},
        {**person, "id": 5, "image_id": 7, "bbox": [0, 0, 10, 10], "area": 0},
        {**person, "id": 6, "image_id": 7, "bbox": [500, 0, 10, 10]},
        {**person, "id": 8, "image_id": 3, "bbox": [2, 2, 10, 10]},
    ]
    # Indexed without load_coco: several of these people would be refused by its checks, and the
    # sample builder must still skip them as upstream's loader does, whatever index it is given.
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "file_name": "7.jpg", "width": 40, "height": 30},
                   {"id": 3, "file_name": "3.jpg", "width": 40, "height": 30}],
        "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    samples = build_topdown_samples(coco, CONFIG)
    assert [(s.image_id, s.annotation_id) for s in samples] == [(7, 1), (3, 8)]
    assert all(s.box_score == 1.0 for s in samples)


# --- decoding and NMS ---------------------------------------------------------------------------

def test_dark_recovers_a_subpixel_gaussian_peak() -> None:
    peaks = [(20.3, 30.7), (5.8, 9.45), (40.61, 55.2)]
    decoded = decode_heatmaps(_gaussian_maps(peaks), np.array([[24.0, 32.0]]),
                              np.array([[0.24, 0.32]]), CONFIG)
    np.testing.assert_allclose(decoded.coords_refined[0], peaks, atol=0.01)
    np.testing.assert_allclose(decoded.maxvals[0, :, 0], 1.0, atol=0.1)


def test_empty_maps_decode_to_the_crop_corner_without_nans() -> None:
    decoded = decode_heatmaps(np.zeros((1, 17, 64, 48), np.float32), np.array([[100.0, 100.0]]),
                              np.array([[0.5, 0.5]]), CONFIG)
    assert np.isfinite(decoded.preds).all()
    np.testing.assert_array_equal(decoded.coords_refined, 0)
    np.testing.assert_array_equal(decoded.maxvals, 0)


def test_rescore_averages_confident_joints_only() -> None:
    maxvals = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.05]], dtype=np.float32)
    np.testing.assert_allclose(rescore(maxvals, np.array([1.0, 1.0]), 0.2), [0.7, 0.0], rtol=1e-6)
    np.testing.assert_allclose(rescore(maxvals, np.array([0.5, 1.0]), 0.2), [0.35, 0.0], rtol=1e-6)


def test_oks_nms_drops_near_duplicates_and_keeps_distinct_people() -> None:
    rng = np.random.default_rng(1)
    pose = np.column_stack((rng.uniform(0, 100, 17), rng.uniform(0, 200, 17), np.ones(17)))
    duplicate = pose + [0.5, 0.5, 0.0]
    elsewhere = pose + [300.0, 0.0, 0.0]
    poses = np.stack((duplicate, pose, elsewhere))
    keep = oks_nms(poses, np.array([0.8, 0.9, 0.7]), np.full(3, 20000.0), threshold=0.9)
    assert keep == [1, 2]


# --- results files and COCOeval -----------------------------------------------------------------

def test_results_json_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    write_results_json([{"image_id": 1, "score": 0.5}], path)
    write_results_json([{"image_id": 2, "score": 0.25}], path)
    assert json.loads(path.read_text()) == [{"image_id": 2, "score": 0.25}]
    with pytest.raises(TypeError):
        write_results_json([{"image_id": object()}], path)
    assert json.loads(path.read_text()) == [{"image_id": 2, "score": 0.25}]
    with pytest.raises(ValueError, match=r"results\.json: 1 non-finite.*detection 1 field score \(nan\)"):
        write_results_json([{"image_id": 1, "score": 0.5}, {"image_id": 3, "score": float("nan")}], path)
    assert json.loads(path.read_text()) == [{"image_id": 2, "score": 0.25}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_ground_truth_as_detections_scores_perfectly(synthetic: CocoKeypointDataset,
                                                     tmp_path: Path) -> None:
    coco = synthetic.coco
    results = _gt_as_results(coco, coco.getImgIds())
    stats = evaluate_keypoints(coco, write_results_json(results, tmp_path / "r.json"))
    assert stats == pytest.approx(ALL_STATS_PERFECT, abs=1e-9)


def test_image_subset_evaluation(synthetic: CocoKeypointDataset, tmp_path: Path) -> None:
    coco = synthetic.coco
    first_two = first_image_ids(coco, 2)
    assert first_two == coco.getImgIds()[:2]
    path = write_results_json(_gt_as_results(coco, first_two), tmp_path / "r.json")
    assert evaluate_keypoints(coco, path, first_two) == pytest.approx(ALL_STATS_PERFECT, abs=1e-9)
    assert evaluate_keypoints(coco, path)["AR"] < 1.0  # the other images' people are missed
    with pytest.raises(ValueError, match="positive number"):
        first_image_ids(coco, 0)


def test_unscorable_results_are_reported(synthetic: CocoKeypointDataset, tmp_path: Path) -> None:
    empty = write_results_json([], tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"empty\.json: expected a non-empty list"):
        evaluate_keypoints(synthetic.coco, empty)
    stray = write_results_json([{"image_id": -1, "category_id": 1, "keypoints": [0] * 51,
                                 "score": 1.0}], tmp_path / "stray.json")
    with pytest.raises(ValueError, match=r"stray\.json: detections for image ids not in"):
        evaluate_keypoints(synthetic.coco, stray)


# --- synthetic dataset --------------------------------------------------------------------------

def test_synthetic_dataset_is_deterministic(tmp_path: Path) -> None:
    first = write_synthetic_coco(tmp_path / "a", seed=3)
    second = write_synthetic_coco(tmp_path / "b", seed=3)
    other = write_synthetic_coco(tmp_path / "c", seed=4)
    assert first.annotation_path.read_bytes() == second.annotation_path.read_bytes()
    assert first.annotation_path.read_bytes() != other.annotation_path.read_bytes()
    for image_id in first.image_ids():
        assert first.image_path(image_id).read_bytes() == second.image_path(image_id).read_bytes()


def test_synthetic_dataset_covers_the_awkward_cases(synthetic: CocoKeypointDataset) -> None:
    assert synthetic.annotation_path.name == "person_keypoints_val2017.json"
    assert synthetic.image_dir.name == "val2017"
    coco = synthetic.coco
    annotations = coco.loadAnns(coco.getAnnIds())
    assert any(a["iscrowd"] for a in annotations)
    assert any(a["num_keypoints"] == 0 and not a["iscrowd"] for a in annotations)
    assert any(a["bbox"][0] < 0 for a in annotations)
    assert not coco.getAnnIds(imgIds=synthetic.image_ids()[-1])
    assert synthetic.image_ids() != sorted(synthetic.image_ids())
    samples = build_topdown_samples(coco, CONFIG)
    evaluable = [a for a in annotations if not a["iscrowd"] and a["num_keypoints"] > 0]
    assert [s.annotation_id for s in samples] == [a["id"] for a in evaluable]
    for image_id in synthetic.image_ids():
        assert synthetic.image_path(image_id).name == f"{image_id:012d}.jpg"


# --- known-answer runs of the whole top-down pipeline -------------------------------------------

@pytest.mark.parametrize(("batch_size", "flip_test"), [(4, True), (1, False)])
def test_oracle_heatmaps_give_perfect_ap(synthetic: CocoKeypointDataset, batch_size: int,
                                         flip_test: bool, tmp_path: Path) -> None:
    samples = build_topdown_samples(synthetic.coco, CONFIG)
    oracle = GroundTruthHeatmapOracle(synthetic, samples, CONFIG)
    evaluation = evaluate_topdown(synthetic, oracle, batch_size=batch_size, config=CONFIG,
                                  flip_test=flip_test, results_path=tmp_path / "results.json")
    assert evaluation.stats == pytest.approx(ALL_STATS_PERFECT, abs=1e-9)
    assert evaluation.num_samples == len(samples) == len(evaluation.results)
    assert json.loads((tmp_path / "results.json").read_text()) == evaluation.results


def test_oracle_keypoints_come_back_to_the_ground_truth(synthetic: CocoKeypointDataset) -> None:
    samples = build_topdown_samples(synthetic.coco, CONFIG)
    oracle = GroundTruthHeatmapOracle(synthetic, samples, CONFIG)
    persons = predict_topdown(synthetic, samples, oracle, CONFIG, batch_size=3,
                              image_ids=synthetic.image_ids())
    for sample, keypoints in zip(samples, persons.keypoints):
        labelled = sample.gt_keypoints[:, 2] > 0
        np.testing.assert_allclose(keypoints[labelled, :2], sample.gt_keypoints[labelled, :2],
                                   atol=0.01)
        assert (keypoints[labelled, 2] > 0.9).all() and (keypoints[~labelled, 2] == 0).all()


def test_missed_people_give_the_predicted_ap(synthetic: CocoKeypointDataset) -> None:
    limit = 3
    samples = build_topdown_samples(synthetic.coco, CONFIG, first_image_ids(synthetic.coco, limit))
    missed = {samples[1].annotation_id}
    oracle = GroundTruthHeatmapOracle(synthetic, samples, CONFIG, missed_annotation_ids=missed)
    evaluation = evaluate_topdown(synthetic, oracle, batch_size=2, config=CONFIG, limit=limit)
    expected = perfect_precision_ap((len(samples) - len(missed)) / len(samples))
    assert evaluation.stats["AP"] == pytest.approx(expected, abs=1e-12)
    assert expected < 1.0


def test_progress_reports_images_rate_and_eta(synthetic: CocoKeypointDataset) -> None:
    samples = build_topdown_samples(synthetic.coco, CONFIG)
    reports: list[TopDownProgress] = []
    evaluate_topdown(synthetic, GroundTruthHeatmapOracle(synthetic, samples, CONFIG), batch_size=2,
                     config=CONFIG, progress=reports.append)
    assert len(reports) == -(-len(samples) // 2)
    done = [r.images_done for r in reports]
    assert done == sorted(done)
    assert done[-1] == reports[-1].images_total == len(synthetic.image_ids())
    assert [r.samples_done for r in reports][-1] == len(samples)
    assert reports[-1].eta_s == 0.0 and reports[-1].images_per_s > 0


def test_limit_evaluates_only_the_first_images(synthetic: CocoKeypointDataset) -> None:
    samples = build_topdown_samples(synthetic.coco, CONFIG)
    evaluation = evaluate_topdown(synthetic, GroundTruthHeatmapOracle(synthetic, samples, CONFIG),
                                  batch_size=4, config=CONFIG, limit=2)
    assert evaluation.image_ids == synthetic.image_ids()[:2]
    assert evaluation.num_samples == sum(s.image_id in evaluation.image_ids for s in samples)
    assert evaluation.stats == pytest.approx(ALL_STATS_PERFECT, abs=1e-9)


def test_wrong_heatmap_shape_is_reported(synthetic: CocoKeypointDataset) -> None:
    def tiny_maps(inputs: np.ndarray) -> np.ndarray:
        return np.zeros((len(inputs), 17, 32, 24), np.float32)

    with pytest.raises(ValueError, match=r"shape \(2, 17, 32, 24\), expected \(2, 17, 64, 48\)"):
        evaluate_topdown(synthetic, tiny_maps, batch_size=2, config=CONFIG, limit=1)


def test_oracle_rejects_crops_it_did_not_prepare(synthetic: CocoKeypointDataset) -> None:
    samples = build_topdown_samples(synthetic.coco, CONFIG)
    oracle = GroundTruthHeatmapOracle(synthetic, samples[:1], CONFIG)
    np.testing.assert_array_equal(oracle(np.zeros((1, 3, 256, 192), np.float32)), 0)
    with pytest.raises(ValueError, match="did not prepare"):
        oracle(np.ones((1, 3, 256, 192), np.float32))


def test_missing_image_stops_the_run_with_its_name(tmp_path: Path) -> None:
    dataset = write_synthetic_coco(tmp_path / "coco", seed=1)
    first = dataset.image_path(dataset.image_ids()[0])
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{first.name}: image file not found"):
        evaluate_topdown(dataset, lambda x: np.zeros((len(x), 17, 64, 48), np.float32),
                         batch_size=1, config=CONFIG, limit=1)
