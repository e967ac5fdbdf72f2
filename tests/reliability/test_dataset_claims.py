"""Datasets that parse but lie: every claim a reader relies on is checked before anything is scored.

``test_readers.py`` probes files that are broken (truncated, corrupt, wrong type); here every file
is well-formed and one claim in it is false: a repeated id, a box of negative size, an image whose
size is not the declared one, a frame count that is not the flow count. Each probe edits a small
valid dataset, opens it through the slice's own reader and expects one error that names the file,
the record (image id, annotation id, scene/frame, clip, subject) and what is wrong. Where upstream's
evaluation tolerates something (an extra image on disk, a non-person annotation), the probe
expects the reader to accept it as upstream does and to say so with one ``UpstreamTolerance``.

A new model's reader plugs in as the COCO one does: a writer of a tiny valid dataset, an opener,
and a table of ``claim id -> (edit, regex of the error)``.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from tooling.coco.dataset import CocoFormatError, CocoKeypointDataset
from tooling.coco.synthetic import write_synthetic_coco
from tooling.validation import UpstreamTolerance


def _expect_named_error(error: type[Exception], open_dataset: Callable[[], object], named: Path,
                        pattern: str) -> str:
    with pytest.raises(error) as info:
        open_dataset()
    message = str(info.value)
    assert named.name in message, f"the error does not name {named.name}: {message}"
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"
    return message


def _quietly(open_dataset: Callable[[], object]) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = open_dataset()
    return opened, [str(w.message) for w in caught if issubclass(w.category, UpstreamTolerance)]


# -- COCO person keypoints --------------------------------------------------------------------------
def _coco(tmp_path: Path) -> tuple[Path, Path, dict]:
    dataset = write_synthetic_coco(tmp_path, seed=3, num_images=4, image_size=(96, 64))
    return dataset.annotation_path, dataset.image_dir, json.loads(dataset.annotation_path.read_text())


def _first_person(data: dict) -> dict:
    """The first annotation with labelled keypoints (the crowd and keypoint-free ones come later)."""
    return next(a for a in data["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"])


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda data: _first_person(data).__setitem__(key, value)


def _repeat_annotation_id(data: dict) -> None:
    data["annotations"][1]["id"] = data["annotations"][0]["id"]


def _repeat_image_id(data: dict) -> None:
    data["images"][1]["id"] = data["images"][0]["id"]


def _visibility(value) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        _first_person(data)["keypoints"][2] = value
    return edit


def _unlabel_but_keep_count(data: dict) -> None:
    person = _first_person(data)
    visible = [i for i in range(2, 51, 3) if person["keypoints"][i] > 0]
    person["keypoints"][visible[0]] = 0  # num_keypoints now claims one joint too many


COCO_CLAIMS: dict[str, tuple[Callable[[dict], None], str]] = {
    "repeated-annotation-id": (_repeat_annotation_id, r"annotations\[1\] \(id \d+\) repeats the id of annotations\[0\]"),
    "repeated-image-id": (_repeat_image_id, r"images\[1\] \(id \d+\) repeats the id of images\[0\]"),
    "string-image-id": (lambda d: [d["images"][0].__setitem__("id", "7")], r"images\[0\] \(id '7'\) has a non-integer id"),
    "float-annotation-id": (_set("id", 2.5), r"\(id 2\.5\) has a non-integer id"),
    "18-keypoints": (lambda d: _first_person(d)["keypoints"].extend([1, 1, 2]), r"keypoints of length 54, expected 17"),
    "visibility-3": (_visibility(3), r"keypoint visibility \[3\], expected 0"),
    "num-keypoints-too-high": (_unlabel_but_keep_count, r"num_keypoints \d+ but \d+ labelled"),
    "negative-box": (_set("bbox", [10.0, 10.0, -5.0, 20.0]), r"bbox .* size -5\.0 x 20\.0, expected a positive"),
    "zero-area": (_set("area", 0), r"area 0, expected a positive number"),
    "no-person-category": (lambda d: d.__setitem__("categories", [{"id": 2, "name": "dog"}]), r"no 'person' category"),
    "annotation-of-absent-image": (_set("image_id", 99), r"refers to image_id 99, which is not in 'images'"),
    "crowd-flag-7": (_set("iscrowd", 7), r"iscrowd 7, expected 0 or 1"),
}


@pytest.mark.parametrize("claim", COCO_CLAIMS)
def test_coco_claim_that_lies_is_named(claim: str, tmp_path: Path):
    annotations, images, data = _coco(tmp_path)
    edit, pattern = COCO_CLAIMS[claim]
    edit(data)
    annotations.write_text(json.dumps(data))
    _expect_named_error(CocoFormatError, lambda: CocoKeypointDataset.open(annotations, images), annotations, pattern)


def test_coco_every_problem_is_listed_in_one_error(tmp_path: Path):
    annotations, images, data = _coco(tmp_path)
    for edit, _ in (COCO_CLAIMS["negative-box"], COCO_CLAIMS["repeated-annotation-id"], COCO_CLAIMS["crowd-flag-7"]):
        edit(data)
    annotations.write_text(json.dumps(data))
    message = _expect_named_error(CocoFormatError, lambda: CocoKeypointDataset.open(annotations, images),
                                  annotations, r"3 problems")
    assert len(message.splitlines()) == 4, message


def test_coco_image_whose_size_is_not_the_declared_one_is_named(tmp_path: Path):
    annotations, images, data = _coco(tmp_path)
    first = data["images"][0]
    cv2.imwrite(str(images / first["file_name"]), np.zeros((32, 48, 3), np.uint8))
    _expect_named_error(CocoFormatError, lambda: CocoKeypointDataset.open(annotations, images), images,
                        rf"{first['file_name']} \(image id {first['id']} of .*\) is 48 x 32 pixels, but the "
                        r"annotations declare 96 x 64")


def test_coco_listed_image_missing_on_disk_is_named(tmp_path: Path):
    annotations, images, data = _coco(tmp_path)
    (images / data["images"][2]["file_name"]).unlink()
    _expect_named_error(CocoFormatError, lambda: CocoKeypointDataset.open(annotations, images), images,
                        rf"{data['images'][2]['file_name']} \(image id {data['images'][2]['id']}.* is missing")


def test_coco_extra_image_and_non_person_annotation_are_tolerated_as_upstream_and_said(tmp_path: Path):
    annotations, images, data = _coco(tmp_path)
    data["annotations"].append({**_first_person(data), "id": 10_000, "category_id": 2})
    data["categories"].append({"id": 2, "name": "dog"})
    annotations.write_text(json.dumps(data))
    cv2.imwrite(str(images / "000000999999.jpg"), np.zeros((8, 8, 3), np.uint8))
    dataset, said = _quietly(lambda: CocoKeypointDataset.open(annotations, images))
    assert len(dataset.coco.getImgIds()) == 4
    assert any("1 annotation(s) of another category than person" in s for s in said), said
    assert any("1 image file(s) not listed" in s for s in said), said


# -- Human3.6M metadata ---------------------------------------------------------------------------
def _h36m(tmp_path: Path, metadata: dict | None) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    entries = {"S9": {"Walking": 6}, "S11": {"Walking": 5}}
    p3 = {s: {e: rng.uniform(-1, 1, (t, 32, 3)).astype(np.float32) for e, t in es.items()} for s, es in entries.items()}
    p2 = {s: {e: [rng.uniform(0, 900, (t, 17, 2)).astype(np.float32) for _ in range(4)] for e, t in es.items()}
          for s, es in entries.items()}
    files = tmp_path / "data_3d_h36m.npz", tmp_path / "data_2d_h36m_cpn_ft_h36m_dbb.npz"
    np.savez(files[0], positions_3d=p3)
    np.savez(files[1], positions_2d=p2, **({} if metadata is None else {"metadata": metadata}))
    return files


H36M_SYMMETRY = [[4, 5, 6, 11, 12, 13], [1, 2, 3, 14, 15, 16]]
H36M_CLAIMS = {
    "num-joints-16": ({"num_joints": 16, "keypoints_symmetry": H36M_SYMMETRY}, r"metadata declares num_joints 16.*refused"),
    "symmetry-swapped": ({"num_joints": 17, "keypoints_symmetry": H36M_SYMMETRY[::-1]},
                         r"metadata declares keypoints_symmetry \[\[1, 2, 3.*refused"),
}


@pytest.mark.parametrize("claim", H36M_CLAIMS)
def test_h36m_metadata_that_disagrees_is_refused(claim: str, tmp_path: Path):
    from tooling.models.videopose3d.human36m import DatasetError, load_test_sequences

    metadata, pattern = H36M_CLAIMS[claim]
    positions, detections = _h36m(tmp_path, metadata)
    _expect_named_error(DatasetError, lambda: load_test_sequences(positions, detections), detections, pattern)


def test_h36m_metadata_that_agrees_is_used_and_absent_metadata_is_said(tmp_path: Path):
    from tooling.models.videopose3d.human36m import load_test_sequences

    agreeing = _h36m(tmp_path, {"layout_name": "h36m", "num_joints": 17, "keypoints_symmetry": H36M_SYMMETRY})
    sequences, said = _quietly(lambda: load_test_sequences(*agreeing))
    assert len(sequences) == 8 and not said
    (tmp_path / "bare").mkdir()
    sequences, said = _quietly(lambda: load_test_sequences(*_h36m(tmp_path / "bare", None)))
    assert len(sequences) == 8 and len(said) == 1 and "no 'metadata'" in said[0]


# -- MPI-Sintel frames and .flo ground truth --------------------------------------------------------
def _sintel(tmp_path: Path) -> tuple[Path, Path]:
    from tooling.models.gma.flo import write_flo
    from tooling.models.gma.sintel import frame_name, write_frame

    rng = np.random.default_rng(5)
    clean, flow = tmp_path / "training" / "clean", tmp_path / "training" / "flow"
    for scene, frames in (("alley_1", 3), ("market_2", 4)):
        (clean / scene).mkdir(parents=True)
        (flow / scene).mkdir(parents=True)
        for number in range(1, frames + 1):
            write_frame(clean / scene / frame_name(number, ".png"), rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
            if number < frames:
                write_flo(flow / scene / frame_name(number, ".flo"), rng.standard_normal((12, 16, 2)).astype(np.float32))
    return clean, flow


def _extra_flow(clean: Path, flow: Path) -> None:
    from tooling.models.gma.flo import write_flo

    write_flo(flow / "alley_1" / "frame_0003.flo", np.zeros((12, 16, 2), np.float32))


def _small_flow(clean: Path, flow: Path) -> None:
    from tooling.models.gma.flo import write_flo

    write_flo(flow / "market_2" / "frame_0002.flo", np.zeros((6, 8, 2), np.float32))


def _mixed_frames(clean: Path, flow: Path) -> None:
    from tooling.models.gma.sintel import write_frame

    write_frame(clean / "market_2" / "frame_0004.png", np.zeros((24, 16, 3), np.uint8))


SINTEL_CLAIMS = {
    "more-flows-than-pairs": (_extra_flow, r"scene alley_1 has 3 frames but 3 flows in .*expected 2"),
    "flow-size-not-frame-size": (_small_flow, r"scene market_2 / frame_0002\.flo is a 8 x 6 flow for 16 x 12 frames"),
    "mixed-frame-sizes": (_mixed_frames, r"scene market_2 mixes frame sizes \(frame_0001\.png is 16 x 12, "
                                         r"frame_0004\.png is 16 x 24\)"),
}


@pytest.mark.parametrize("claim", SINTEL_CLAIMS)
def test_sintel_claim_that_lies_is_named(claim: str, tmp_path: Path):
    from tooling.models.gma.sintel import SintelLayoutError, sintel_pairs

    clean, flow = _sintel(tmp_path)
    edit, pattern = SINTEL_CLAIMS[claim]
    edit(clean, flow)
    _expect_named_error(SintelLayoutError, lambda: sintel_pairs(clean, flow), clean, pattern)


def test_sintel_flows_of_a_scene_without_frames_are_tolerated_and_said(tmp_path: Path):
    from tooling.models.gma.sintel import sintel_pairs

    clean, flow = _sintel(tmp_path)
    (flow / "cave_4").mkdir()
    pairs, said = _quietly(lambda: sintel_pairs(clean, flow))
    assert len(pairs) == 5 and len(said) == 1 and "cave_4" in said[0]


# -- FOMM clips and frame folders -------------------------------------------------------------------
def _clips(tmp_path: Path) -> Path:
    from tooling.models.fomm.video import write_mp4

    folder = tmp_path / "taichi" / "test"
    (folder / "b-frames").mkdir(parents=True)
    rng = np.random.default_rng(6)
    write_mp4(folder / "a.mp4", rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))
    for t in range(3):
        cv2.imwrite(str(folder / "b-frames" / f"{t:04d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return folder


def _shorter_mp4(folder: Path) -> None:
    from tooling.models.fomm.video import write_mp4

    write_mp4(folder / "a.mp4", np.zeros((3, 48, 64, 3), np.uint8))


FOMM_CLAIMS = {
    "mp4-of-another-size": (_shorter_mp4, r"clip a\.mp4 has 64 x 48 frames; the networks take 64 x 64"),
    "mixed-frame-sizes": (lambda f: cv2.imwrite(str(f / "b-frames" / "0002.png"), np.zeros((32, 64, 3), np.uint8)),
                          r"clip b-frames mixes frame sizes \(0000\.png is 64 x 64, 0002\.png is 64 x 32\)"),
    "empty-frame-folder": (lambda f: (f / "c-empty").mkdir(), r"clip c-empty is a frame folder without images"),
    "empty-mp4": (lambda f: (f / "d.mp4").write_bytes(b""), r"clip d\.mp4 cannot be opened by OpenCV or holds no frame"),
}


@pytest.mark.parametrize("claim", FOMM_CLAIMS)
def test_fomm_clip_that_lies_is_named(claim: str, tmp_path: Path):
    from tooling.models.fomm.video import VideoError, check_clips, list_clips

    folder = _clips(tmp_path)
    edit, pattern = FOMM_CLAIMS[claim]
    edit(folder)
    _expect_named_error(VideoError, lambda: check_clips(list_clips(folder), 64, 64), folder, pattern)


def test_fomm_clips_of_the_network_size_pass(tmp_path: Path):
    from tooling.models.fomm.video import check_clips, list_clips

    check_clips(list_clips(_clips(tmp_path)), 64, 64)


# -- checkpoints: another model's file in a model's slot -----------------------------------------
def test_checkpoint_of_another_model_is_named_as_such(tmp_path: Path):
    import torch

    from tooling.slice import ModelSlice
    from tooling.weights import CheckpointError, WeightsChoice, apply_weights, known_layouts

    pose_net_keys = sorted(known_layouts()["fomm/pose_estimator"])
    path = tmp_path / "taichi-cpk.pth.tar"
    torch.save({k: torch.zeros(1) for k in pose_net_keys}, path)  # the pose net where the detector belongs
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(CheckpointError) as info:
        apply_weights(network, WeightsChoice(path), ModelSlice(), "kp_detector", ("kp_detector",))
    message = str(info.value)
    assert message.startswith(f"{path}: a checkpoint of fomm/pose_estimator (100% of its keys), not of kp_detector")
    assert "missing keys" in message  # the strict load's own finding is kept


def test_checkpoint_of_no_known_model_keeps_the_strict_load_error(tmp_path: Path):
    import torch

    from tooling.slice import ModelSlice
    from tooling.weights import CheckpointError, WeightsChoice, apply_weights

    path = tmp_path / "net.pth"
    torch.save({"something.else": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"net\.pth: does not fit Sequential"):
        apply_weights(torch.nn.Sequential(torch.nn.Linear(2, 2)), WeightsChoice(path), ModelSlice(), "net", ())
