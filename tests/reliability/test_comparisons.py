"""NaN and Inf never agree: on either side of a comparison they are violations, named as such,
unless the yaml allows them for that output (``allow_nonfinite: true``); a deployed backend that
returns them stops an accuracy pass instead of feeding them to the metric."""
from __future__ import annotations

import numpy as np
import pytest

from tooling.accuracy import run_accuracy
from tooling.compare import ComparisonError, assert_outputs_match, compare_array
import yaml

from tooling.baseline import BASELINES_DIR, parse_model_spec
from tooling.locations import Roots
from tooling.model_spec import ModelSpecError, Tolerance
from tooling.models.videopose3d.slice import write_known_answer
from tooling.workspace import Options, Workspace

TOL = Tolerance(atol=1e-3, rtol=1e-3)
ALLOWED = Tolerance(atol=1e-3, rtol=1e-3, allow_nonfinite=True)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("actual", "expected"), [
    ([NAN, NAN, NAN], [NAN, NAN, NAN]),  # the all-NaN decoded outputs that used to pass
    ([NAN, 1.0, 2.0], [0.5, 1.0, 2.0]),
    ([0.5, 1.0, 2.0], [NAN, 1.0, 2.0]),  # a NaN in the reference (a golden, torch) is no excuse
    ([INF, 1.0, 2.0], [INF, 1.0, 2.0]),
], ids=["both-all-nan", "nan-actual", "nan-expected", "same-inf"])
def test_nonfinite_on_either_side_is_a_named_violation(actual, expected):
    with pytest.raises(ComparisonError, match=r"y out of tolerance\n.*NaN/Inf in \d+ actual and \d+ expected"):
        assert_outputs_match({"y": np.array(actual)}, {"y": np.array(expected)}, {"y": TOL}, "probe")


def test_yaml_may_allow_nonfinite_at_matching_places():
    assert compare_array("y", np.array([NAN, INF, 1.0]), np.array([NAN, INF, 1.0]), ALLOWED).passed
    assert not compare_array("y", np.array([NAN, 0.0, 1.0]), np.array([0.0, 0.0, 1.0]), ALLOWED).passed
    raw = yaml.safe_load((BASELINES_DIR / "videopose3d.yaml").read_text())
    assert not parse_model_spec(raw, "videopose3d.yaml").tolerance("vp3d", "3d_preds").allow_nonfinite
    raw["networks"]["vp3d"]["outputs"]["3d_preds"]["allow_nonfinite"] = True
    assert parse_model_spec(raw, "videopose3d.yaml").tolerance("vp3d", "3d_preds").allow_nonfinite
    raw["networks"]["vp3d"]["outputs"]["3d_preds"]["allow_nonfinite"] = "yes"
    with pytest.raises(ModelSpecError, match="allow_nonfinite"):
        parse_model_spec(raw, "videopose3d.yaml")


def test_nan_from_a_deployed_backend_stops_the_accuracy_pass(tmp_path, monkeypatch):
    answer = write_known_answer(tmp_path / "ka")
    handle = Workspace(Roots(answer.data_root, answer.weights_root, None, tmp_path / "cache"), Options()).model("videopose3d")

    class NanSession:
        def run(self, feeds):
            frames = feeds["2d_poses"].shape[1] - 242
            return {"3d_preds": np.full((2, frames, 17, 3), np.nan, np.float32)}

    monkeypatch.setattr(handle, "session", lambda *args, **kwargs: NanSession())
    with pytest.raises(FloatingPointError, match=r"videopose3d/vp3d on onnxruntime: output 3d_preds holds \d+ NaN"):
        run_accuracy(handle, "onnxruntime", profile="smoke")
