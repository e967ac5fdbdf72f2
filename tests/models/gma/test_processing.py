"""GMA data path: Sintel enumeration, padding, .flo files, the metric, and the known-answer set."""
from __future__ import annotations

import numpy as np
import pytest

from tooling.models.gma import FloError, InputPadder, read_flo, write_flo
from tooling.models.gma.flo import decode_flo, encode_flo
from tooling.models.gma.known_answer import SCENES, Affine, flow_between, write_warped_sintel
from tooling.models.gma.metric import FlowErrorTotals, endpoint_error
from tooling.models.gma.sintel import DATA, PASSES, SintelLayoutError, read_frame, sintel_pairs

from .conftest import FIXTURES, GOLDEN

pytestmark = [pytest.mark.gma]


@pytest.fixture(scope="module")
def postprocess():
    with np.load(GOLDEN / "postprocess_public.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def warped_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("warped-sintel")
    flows = write_warped_sintel(root, FIXTURES / "frames")
    return root, flows


# --- padding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["20x30", "21x27", "24x32"])
def test_padder_matches_golden(postprocess, size):
    height, width = map(int, size.split("x"))
    padder = InputPadder(height, width)
    assert list(padder.pads) == postprocess[f"pad_{size}_padlist"].tolist()
    padded = padder.pad(postprocess[f"pad_{size}_in"])
    np.testing.assert_array_equal(padded, postprocess[f"pad_{size}_out"])
    np.testing.assert_array_equal(padder.unpad(padded), postprocess[f"pad_{size}_in"])


def test_sintel_frames_pad_two_rows_each_side(postprocess):
    padder = InputPadder(436, 1024)
    assert list(padder.pads) == postprocess["pad_436x1024_padlist"].tolist() == [0, 0, 2, 2]
    assert padder.padded_shape == (440, 1024)


def test_unpad_of_a_wrong_size_is_an_error():
    with pytest.raises(ValueError, match=r"cannot unpad an array of spatial size \(436, 1024\): expected \(440, 1024\)"):
        InputPadder(436, 1024).unpad(np.zeros((2, 436, 1024)))


# --- .flo ----------------------------------------------------------------------------------------

def test_flo_decodes_golden_bytes_and_round_trips(postprocess, tmp_path):
    data = postprocess["flo_bytes"].tobytes()
    flow = decode_flo(data)
    assert flow.dtype == np.float32
    np.testing.assert_array_equal(flow, postprocess["flo_decoded"])
    assert encode_flo(flow) == data
    write_flo(tmp_path / "f.flo", flow)
    np.testing.assert_array_equal(read_flo(tmp_path / "f.flo"), flow)
    assert [p.name for p in tmp_path.iterdir()] == ["f.flo"]  # no temporary left behind


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda b: b[:-4], r"truncated: 104 bytes, a 4 x 3 field needs 108"),
    (lambda b: b[:7], r"7 bytes, too short for a .flo header"),
    (lambda b: b + b"\0" * 8, r"has trailing bytes"),
    (lambda b: b"PIEX" + b[4:], r"not a .flo file \(magic b'PIEX'"),
    (lambda b: b[:4] + np.array([0, 3], "<i4").tobytes() + b[12:], r"header declares a 0 x 3 flow field"),
])
def test_bad_flo_files_are_named(postprocess, tmp_path, mangle, message):
    path = tmp_path / "frame_0001.flo"
    path.write_bytes(mangle(postprocess["flo_bytes"].tobytes()))
    with pytest.raises(FloError, match=f"frame_0001.flo: {message}"):
        read_flo(path)


def test_missing_flo_is_named(tmp_path):
    with pytest.raises(FloError, match="nothing.flo: cannot read"):
        read_flo(tmp_path / "nothing.flo")


# --- metric --------------------------------------------------------------------------------------

def test_metric_matches_golden(postprocess):
    padder = InputPadder(21, 27)
    totals = FlowErrorTotals()
    for k in range(3):
        epe = endpoint_error(padder.unpad(postprocess[f"metric_pred_{k}"][0]), postprocess[f"metric_gt_{k}"])
        np.testing.assert_allclose(epe, postprocess[f"metric_epe_map_{k}"], rtol=1e-6, atol=1e-6)
        totals.add(FlowErrorTotals.record(epe))
    summary = totals.summary()
    assert summary["epe"] == pytest.approx(float(postprocess["metric_epe"]), abs=1e-6)
    for t in (1, 3, 5):
        assert summary[f"{t}px"] == pytest.approx(float(postprocess[f"metric_px{t}"]), abs=1e-12)


def test_thresholds_are_strict():
    totals = FlowErrorTotals()
    totals.add(FlowErrorTotals.record(np.array([0.5, 1.0, 3.0, 4.9, 5.0])))
    assert totals.summary() == {"epe": pytest.approx(2.88), "1px": 0.2, "3px": 0.4, "5px": 0.8}


# --- Sintel layout -------------------------------------------------------------------------------

def test_pairs_are_enumerated_scene_by_scene(warped_set):
    root, flows = warped_set
    pairs = sintel_pairs(root / DATA["final"], root / DATA["flow"])
    assert [(p.index, p.scene, p.frame1.name, p.frame2.name, p.flow.name) for p in pairs] == [
        (0, "jump", "frame_0001.png", "frame_0002.png", "frame_0001.flo"),
        (1, "pan_zoom", "frame_0001.png", "frame_0002.png", "frame_0001.flo"),
        (2, "pan_zoom", "frame_0002.png", "frame_0003.png", "frame_0002.flo"),
        (3, "rotate", "frame_0001.png", "frame_0002.png", "frame_0001.flo"),
        (4, "rotate", "frame_0002.png", "frame_0003.png", "frame_0002.flo"),
    ]
    assert all(p.frame1.parent.parent.name == "final" for p in pairs)
    assert len(flows["clean"]) == len(pairs)


def test_a_missing_flow_file_is_named(warped_set, tmp_path):
    root, _ = warped_set
    with pytest.raises(SintelLayoutError, match=r"frame_0001.flo not found"):
        sintel_pairs(root / DATA["clean"], tmp_path)


def test_frames_read_as_rgb_floats():
    frame = read_frame(FIXTURES / "frames" / "frame_0047.png")
    assert frame.shape == (3, 436, 1024) and frame.dtype == np.float32
    assert frame.sum(dtype=np.float64) < 78608508  # the golden's padded sum adds four rows


# --- the known-answer set ------------------------------------------------------------------------

def test_affine_flow_is_exact_geometry():
    first, second = Affine.make((100, 100)), Affine.make((103.0, 98.0))
    np.testing.assert_allclose(flow_between(first, second), np.broadcast_to([-3.0, 2.0], (124, 128, 2)), atol=1e-9)


def test_warped_frames_follow_their_flow(warped_set):
    """Frame 2 sampled at p + flow(p) shows what frame 1 shows at p (up to interpolation)."""
    import cv2

    root, flows = warped_set
    pair = sintel_pairs(root / DATA["clean"], root / DATA["flow"])[1]
    image1, image2 = read_frame(pair.frame1)[1], read_frame(pair.frame2)[1]
    flow = read_flo(pair.flow)
    rows, cols = np.mgrid[0:124, 0:128].astype(np.float32)
    back = cv2.remap(image2, cols + flow[..., 0], rows + flow[..., 1], cv2.INTER_LINEAR)
    inside = (slice(10, -10), slice(10, -10))
    residual = np.abs(back[inside] - image1[inside]).mean()
    unwarped = np.abs(image2[inside] - image1[inside]).mean()
    assert residual < 0.25 * unwarped


def test_zero_flow_scores_the_mean_flow_magnitude(warped_set):
    """The second known answer: predicting no motion gives EPE = mean |flow| over all pixels,
    and the 1 px accuracy is the share of pixels moving less than a pixel."""
    root, flows = warped_set
    for pass_name in PASSES:
        totals = FlowErrorTotals()
        truths = [read_flo(p.flow) for p in sintel_pairs(root / DATA[pass_name], root / DATA["flow"])]
        for truth in truths:
            totals.add(FlowErrorTotals.record(endpoint_error(np.zeros((2, 124, 128), np.float32), truth)))
        magnitudes = np.concatenate([np.hypot(f[..., 0], f[..., 1]).ravel() for f in flows[pass_name]])
        summary = totals.summary()
        assert summary["epe"] == pytest.approx(float(magnitudes.mean()), rel=1e-6)
        assert summary["1px"] == pytest.approx(float((magnitudes < 1).mean()))
        assert 1.0 < summary["epe"] < 20.0  # the set really moves


def test_every_scene_has_a_distinct_motion():
    assert len(SCENES) == 3 and sum(len(v) - 1 for v in SCENES.values()) == 5


def test_a_truncated_frame_is_named(tmp_path):
    data = (FIXTURES / "frames" / "frame_0047.png").read_bytes()
    (tmp_path / "frame_0001.png").write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(SintelLayoutError, match=r"frame_0001.png: truncated image"):
        read_frame(tmp_path / "frame_0001.png")
