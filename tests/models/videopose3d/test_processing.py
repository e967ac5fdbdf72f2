"""VideoPose3D pre/post-processing and metric against the upstream goldens, plus error paths."""
from __future__ import annotations

import numpy as np
import pytest

from tooling.model_spec import FIXTURES_DIR
from tooling.models.videopose3d.human36m import (
    DatasetError,
    ground_truth_pair,
    load_test_sequences,
    padded_flip_pair,
)
from tooling.models.videopose3d.metric import SequenceError, action_wise, fuse_flip_pair, procrustes_mpjpe, sequence_mpjpe

pytestmark = [pytest.mark.videopose3d]
GOLDEN = FIXTURES_DIR / "videopose3d" / "golden"


def _write_dataset_from_golden(golden, directory):
    """Rebuild the two Human3.6M npz files the golden was computed from."""
    positions_3d, positions_2d = {}, {}
    for key in golden.files:
        if key.startswith("raw__world3d__"):
            _, _, subject, entry = key.split("__")
            positions_3d.setdefault(subject, {})[entry] = golden[key]
            positions_2d.setdefault(subject, {})[entry] = [
                golden[f"raw__kp2d_px__{subject}__{entry}__cam{c}"] for c in range(4)
            ]
    p3, p2 = directory / "data_3d.npz", directory / "data_2d.npz"
    np.savez(p3, positions_3d=positions_3d)
    np.savez(p2, positions_2d=positions_2d, metadata={"keypoints_symmetry": [[4, 5, 6, 11, 12, 13], [1, 2, 3, 14, 15, 16]]})
    return p3, p2


@pytest.mark.parity
def test_preprocessing_reproduces_golden(tmp_path):
    golden = np.load(GOLDEN / "preprocess_public.npz")
    sequences = load_test_sequences(*_write_dataset_from_golden(golden, tmp_path))
    assert [s.stem for s in sequences] == list(golden["stems"])
    length = int(golden["max_length"])
    for seq in sequences:
        pair, delta = padded_flip_pair(seq.keypoints_2d, length)
        assert delta == int(golden[f"delta__{seq.stem}"]), seq.stem
        np.testing.assert_array_equal(pair, golden[f"input__{seq.stem}"], err_msg=seq.stem)
        np.testing.assert_allclose(ground_truth_pair(seq.positions_3d), golden[f"gt__{seq.stem}"], atol=2e-6, err_msg=seq.stem)


@pytest.mark.parity
def test_postprocessing_and_action_wise_mpjpe_reproduce_golden():
    golden = np.load(GOLDEN / "postprocess_public.npz")
    stems = sorted(k.removeprefix("pred__") for k in golden.files if k.startswith("pred__"))
    errors = []
    for stem in stems:
        fused = fuse_flip_pair(golden[f"pred__{stem}"], int(golden[f"delta__{stem}"]))
        np.testing.assert_allclose(fused, golden[f"fused__{stem}"], atol=1e-6, err_msg=stem)
        error = sequence_mpjpe(fused, golden[f"gt__{stem}"])
        assert error == pytest.approx(float(golden[f"seq_mpjpe_m__{stem}"]), abs=1e-7), stem
        errors.append(SequenceError(stem.split("_", 1)[1], fused.shape[0], error, 0.0))
    per_action, final = action_wise(errors)
    assert list(per_action) == list(golden["actions"])
    np.testing.assert_allclose(list(per_action.values()), golden["action_mpjpe_mm"], atol=1e-4)
    assert final == pytest.approx(float(golden["final_mpjpe_mm"]), abs=1e-4)
    # The frame-weighted mean over every sequence is a different (wrong) protocol.
    assert abs(final - float(golden["contrast_frame_weighted_all_mm"])) > 1e-3


def test_procrustes_error_ignores_similarity_transforms():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((5, 17, 3)).astype(np.float32)
    truth[:, 0] = 0
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    moved = (1.7 * truth @ rotation.T + [0.3, -0.2, 1.0]).astype(np.float32)
    pair = np.stack([truth, truth])
    assert procrustes_mpjpe(moved, pair) == pytest.approx(0.0, abs=1e-5)
    assert sequence_mpjpe(moved, pair) > 0.5
    noisy = moved + rng.normal(0, 0.05, moved.shape).astype(np.float32)
    assert 0 < procrustes_mpjpe(noisy, pair) < sequence_mpjpe(noisy, pair)


def test_sequence_longer_than_the_input_window_is_refused():
    with pytest.raises(DatasetError, match="does not fit the 260-frame input"):
        padded_flip_pair(np.zeros((19, 17, 2), np.float32), 260)


def test_unreadable_dataset_file_is_named(tmp_path):
    broken = tmp_path / "data_3d_h36m.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="data_3d_h36m.npz: not a readable npz"):
        load_test_sequences(broken, tmp_path / "missing.npz")
    with pytest.raises(DatasetError, match="missing.npz: file not found"):
        np.savez(broken, positions_3d={"S9": {}, "S11": {}})
        load_test_sequences(broken, tmp_path / "missing.npz")


def test_short_detection_track_is_reported_with_its_place(tmp_path):
    world = np.zeros((10, 32, 3), np.float32)
    p3, p2 = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(p3, positions_3d={"S9": {"Walking": world}, "S11": {}})
    np.savez(p2, positions_2d={"S9": {"Walking": [np.zeros((10, 17, 2), np.float32)] * 3 + [np.zeros((9, 17, 2), np.float32)]}})
    with pytest.raises(DatasetError, match=r"S9 / Walking camera 3: shape \(9, 17, 2\)"):
        load_test_sequences(p3, p2, subjects=("S9",))
