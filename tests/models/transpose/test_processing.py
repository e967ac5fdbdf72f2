"""TransPose-R pre/post-processing and evaluation against the upstream goldens (spec 003 d/e/h),
clear errors on bad inputs, and the full pipeline driven by the real port through onnxruntime."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tooling.coco.dataset import CocoFormatError, ImageReadError, load_coco, read_image
from tooling.coco.evaluation import KEYPOINT_STAT_NAMES, evaluate_keypoints, write_results_json
from tooling.coco.keypoints import FLIP_PAIRS, KEYPOINT_NAMES, flip_permutation
from tooling.coco.synthetic import write_synthetic_coco
from tooling.coco.topdown import (
    PersonPredictions,
    TopDownSample,
    box_to_center_scale,
    build_topdown_samples,
    clean_box,
    crop_matrix,
    decode_heatmaps,
    flip_back,
    fuse_flip,
    keypoint_results,
    padded_box_area,
    preprocess_sample,
)
from tooling.coco.transforms import flip_width, get_affine_transform, normalize_rgb, warp_crop
from tooling.models.transpose import (
    ONNX_INPUT_NAME,
    ONNX_OUTPUT_NAME,
    TRANSPOSE_R_TOPDOWN,
    build_transpose_r,
    evaluate_transpose_r,
)
from tooling.export import export_onnx
from tooling.seeded import apply_seeded_weights

pytestmark = [pytest.mark.transpose]

GOLDEN_DIR = Path(__file__).resolve().parents[3] / "fixtures" / "transpose" / "golden"
CONFIG = TRANSPOSE_R_TOPDOWN


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / name) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def preprocess_golden() -> dict[str, np.ndarray]:
    return _load("preprocess_public.npz")


@pytest.fixture(scope="module")
def postprocess_golden() -> dict[str, np.ndarray]:
    return _load("postprocess_public.npz")


@pytest.fixture(scope="module")
def eval_golden() -> dict[str, np.ndarray]:
    return _load("eval_public.npz")


def _sample(center: np.ndarray, scale: np.ndarray, image_id: int = 0) -> TopDownSample:
    return TopDownSample(image_id=image_id, file_name="", annotation_id=0, center=center,
                         scale=scale, area=padded_box_area(scale), box_score=1.0,
                         gt_keypoints=np.zeros((17, 3)))


# --- preprocessing ------------------------------------------------------------------------------

@pytest.mark.parity
def test_box_cleaning_and_center_scale_match_golden(
        preprocess_golden: dict[str, np.ndarray]) -> None:
    g = preprocess_golden
    width, height = int(g["image_width"]), int(g["image_height"])
    for i, raw_box in enumerate(g["boxes_xywh"]):
        box = clean_box(raw_box, width, height)
        assert box is not None
        np.testing.assert_allclose(box, g["clean_boxes_xywh"][i], atol=1e-9)
        center, scale = box_to_center_scale(box, CONFIG)
        assert center.dtype == np.float32 and scale.dtype == np.float32
        np.testing.assert_array_equal(center, g["center"][i])
        np.testing.assert_array_equal(scale, g["scale"][i])


@pytest.mark.parity
def test_affine_matrices_match_golden(preprocess_golden: dict[str, np.ndarray]) -> None:
    g = preprocess_golden
    for i in range(len(g["center"])):
        forward = get_affine_transform(g["center"][i], g["scale"][i], CONFIG.input_size,
                                       size_minus_one=True)
        inverse = get_affine_transform(g["center"][i], g["scale"][i], CONFIG.heatmap_size,
                                       size_minus_one=True, inverse=True)
        np.testing.assert_allclose(forward, g["trans_input"][i], atol=1e-9)
        np.testing.assert_allclose(inverse, g["trans_inv_heatmap"][i], atol=1e-9)


@pytest.mark.parity
def test_crops_and_network_inputs_match_golden_exactly(
        preprocess_golden: dict[str, np.ndarray]) -> None:
    g = preprocess_golden
    for i in range(len(g["center"])):
        sample = _sample(g["center"][i], g["scale"][i])
        warped = warp_crop(g["image_rgb"], crop_matrix(sample, CONFIG), CONFIG.input_size)
        np.testing.assert_array_equal(warped, g["warped_rgb_uint8"][i])
        network_input = preprocess_sample(g["image_rgb"], sample, CONFIG)
        np.testing.assert_array_equal(network_input, g["input"][i])
        np.testing.assert_array_equal(flip_width(network_input), g["input_flipped"][i])
    np.testing.assert_array_equal(normalize_rgb(g["warped_rgb_uint8"]), g["input"])


# --- postprocessing -----------------------------------------------------------------------------

@pytest.mark.parity
def test_flip_fusion_matches_golden(postprocess_golden: dict[str, np.ndarray]) -> None:
    g = postprocess_golden
    np.testing.assert_array_equal(flip_back(g["heatmaps_flipped"]), g["flip_back"])
    np.testing.assert_allclose(fuse_flip(g["heatmaps"], g["heatmaps_flipped"]), g["fused"],
                               atol=1e-7, rtol=0)


@pytest.mark.parity
def test_dark_decoding_matches_golden(postprocess_golden: dict[str, np.ndarray]) -> None:
    g = postprocess_golden
    decoded = decode_heatmaps(g["fused"], g["center"], g["scale"], CONFIG)
    np.testing.assert_array_equal(decoded.coords_argmax, g["coords_argmax"])
    np.testing.assert_allclose(decoded.coords_refined, g["coords_heatmap_dark"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(decoded.preds, g["preds"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(decoded.maxvals, g["maxvals"], atol=1e-6, rtol=0)


@pytest.mark.parity
def test_dark_edge_cases_from_the_golden(postprocess_golden: dict[str, np.ndarray]) -> None:
    g = postprocess_golden
    decoded = decode_heatmaps(g["fused"], g["center"], g["scale"], CONFIG)
    # Peaks on the left and bottom border are not refined.
    np.testing.assert_array_equal(decoded.coords_refined[0, :2], decoded.coords_argmax[0, :2])
    assert decoded.coords_argmax[0, 0, 0] == 0 and decoded.coords_argmax[0, 1, 1] == 63
    # (2, 2) is the first interior position that gets the Taylor step.
    np.testing.assert_array_equal(decoded.coords_argmax[1, 2], [2, 2])
    assert not np.array_equal(decoded.coords_refined[1, 2], [2, 2])
    # A negative map keeps (0, 0), mapped through the box transform.
    assert decoded.maxvals[3, 5, 0] < 0
    np.testing.assert_array_equal(decoded.coords_refined[3, 5], [0, 0])


def test_flip_pairs_swap_left_and_right_joints() -> None:
    permutation = flip_permutation()
    np.testing.assert_array_equal(permutation[permutation], np.arange(17))
    assert permutation[0] == 0
    for left, right in FLIP_PAIRS:
        assert KEYPOINT_NAMES[left].startswith("left_")
        assert KEYPOINT_NAMES[right] == KEYPOINT_NAMES[left].replace("left_", "right_")
        assert permutation[left] == right
    maps = np.random.default_rng(0).random((2, 17, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(flip_back(flip_back(maps)), maps)
    np.testing.assert_array_equal(flip_back(maps)[:, 5], maps[:, 6, :, ::-1])


# --- evaluation ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_annotation_file(eval_golden: dict[str, np.ndarray],
                         tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval_golden") / "person_keypoints_val2017.json"
    path.write_text(str(eval_golden["gt_json"]), encoding="utf-8")
    return path


@pytest.mark.parity
def test_gt_box_sample_list_matches_golden(eval_golden: dict[str, np.ndarray],
                                           eval_annotation_file: Path) -> None:
    samples = build_topdown_samples(load_coco(eval_annotation_file), CONFIG)
    # The golden appends an eighth, shifted duplicate of the first person (box score 0.9).
    real = slice(0, 7)
    assert [s.image_id for s in samples] == eval_golden["db_image_ids"][real].tolist()
    np.testing.assert_array_equal(np.stack([s.center for s in samples]),
                                  eval_golden["db_center"][real])
    np.testing.assert_array_equal(np.stack([s.scale for s in samples]),
                                  eval_golden["db_scale"][real])
    np.testing.assert_array_equal([s.area for s in samples], eval_golden["all_boxes"][real, 4])


@pytest.mark.parity
def test_rescoring_nms_and_cocoeval_match_golden(eval_golden: dict[str, np.ndarray],
                                                 eval_annotation_file: Path,
                                                 tmp_path: Path) -> None:
    g = eval_golden
    decoded = decode_heatmaps(g["heatmaps"], g["db_center"], g["db_scale"], CONFIG)
    np.testing.assert_allclose(decoded.preds, g["all_preds"][..., :2], atol=1e-3, rtol=0)
    np.testing.assert_allclose(decoded.maxvals[..., 0], g["all_preds"][..., 2], atol=1e-6, rtol=0)
    areas = np.array([padded_box_area(scale) for scale in g["db_scale"]])
    np.testing.assert_array_equal(areas, g["all_boxes"][:, 4])
    persons = PersonPredictions(image_ids=g["db_image_ids"],
                                keypoints=np.concatenate((decoded.preds, decoded.maxvals), axis=2),
                                areas=areas, box_scores=g["box_scores"])
    results = keypoint_results(persons, CONFIG)
    rows = np.array([[r["image_id"], r["score"], *r["keypoints"]] for r in results])
    assert rows.shape == g["results"].shape  # the duplicate was suppressed by OKS-NMS
    np.testing.assert_array_equal(rows[:, 0], g["results"][:, 0])
    np.testing.assert_allclose(rows[:, 1], g["results"][:, 1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(rows[:, 2:], g["results"][:, 2:], atol=1e-3, rtol=0)
    stats = evaluate_keypoints(load_coco(eval_annotation_file),
                               write_results_json(results, tmp_path / "results.json"))
    assert list(stats) == list(KEYPOINT_STAT_NAMES)
    np.testing.assert_allclose(list(stats.values()), g["stats"], atol=1e-9, rtol=0)
    assert math.isclose(stats["AP"], 0.9171, abs_tol=5e-5)


# --- clear errors -------------------------------------------------------------------------------

def test_malformed_json_is_reported_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "person_keypoints_val2017.json"
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(CocoFormatError, match=r"person_keypoints_val2017\.json: not valid JSON"):
        load_coco(path)


PERSON = [{"id": 1, "name": "person"}]


@pytest.mark.parametrize(("dataset", "problem"), [
    ([], "top level is a list"),
    ({"images": [], "categories": PERSON}, "top-level 'annotations' must be a list, found missing"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 4}], "annotations": [], "categories": PERSON},
     r"images\[0\] lacks field\(s\) height"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
      "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4,
                       "iscrowd": 0, "num_keypoints": 0}],
      "categories": PERSON},
     r"annotations\[0\] lacks field\(s\) keypoints"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
      "annotations": [{"id": 7, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4,
                       "iscrowd": 0, "num_keypoints": 0, "keypoints": [0] * 51}],
      "categories": PERSON},
     r"annotations\[0\] \(id 7\) refers to image_id 2"),
])
def test_structurally_wrong_annotation_files_are_named(tmp_path: Path, dataset: object,
                                                       problem: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(dataset), encoding="utf-8")
    with pytest.raises(CocoFormatError, match=rf"broken\.json: {problem}"):
        load_coco(path)


def test_missing_annotation_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CocoFormatError, match=r"absent\.json: annotation file not found"):
        load_coco(tmp_path / "absent.json")


def test_missing_image_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"000000000139\.jpg: image file not found"):
        read_image(tmp_path / "000000000139.jpg")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    path = tmp_path / "000000000785.jpg"
    # Whole (start and end markers present), yet no image inside: the decoder is what refuses it.
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg \xff\xd9")
    with pytest.raises(ImageReadError, match=r"000000000785\.jpg: OpenCV could not decode"):
        read_image(path)


# --- full pipeline with the real port -----------------------------------------------------------

def test_pipeline_runs_the_seeded_port_through_onnxruntime(tmp_path: Path) -> None:
    """Static batch-2 export (the seed's per-bs graphs), so the short last batch gets padded."""
    dataset = write_synthetic_coco(tmp_path / "coco", seed=0)
    model = apply_seeded_weights(build_transpose_r(), salt="public")
    onnx_path = tmp_path / "transpose_r_bs2.onnx"
    crops = {ONNX_INPUT_NAME: np.zeros((2, 3, 256, 192), np.float32)}
    export_onnx(model, crops, [ONNX_OUTPUT_NAME], onnx_path, exporter="torchscript", opset=11)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    batch_sizes: list[int] = []

    def run_batch(inputs: np.ndarray) -> np.ndarray:
        batch_sizes.append(len(inputs))
        return session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: inputs})[0]

    evaluation = evaluate_transpose_r(dataset, run_batch, batch_size=2, limit=1,
                                      results_path=tmp_path / "results.json")
    assert evaluation.num_samples == 3
    assert batch_sizes == [2, 2, 2, 2]  # two batches, plain and mirrored, the last one padded
    assert set(evaluation.stats) == set(KEYPOINT_STAT_NAMES)
    assert all(math.isfinite(v) for v in evaluation.stats.values())
    written = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert written == evaluation.results
    assert 1 <= len(written) <= 3
    assert all(len(r["keypoints"]) == 51 for r in written)
