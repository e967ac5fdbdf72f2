"""Each slice draws its disagreement picture (what the agreement gate saves for the report) from a
smoke case's torch eager outputs and a perturbed copy standing in for a backend's: the picture
is an image, and drawing a call whose outputs moved shows where."""
from __future__ import annotations

import numpy as np
import pytest

from tooling import planning
from tooling.baseline import load_model_spec

PICTURED = {"videopose3d": "vp3d", "transpose": "transpose_r", "dekr": "hrnet_dekr", "gma": "gma", "fomm": "generator"}


# Each row carries its model's marker: `-m gma` selects it, and its cached verdict is keyed by that slice.
@pytest.mark.parametrize("model", [pytest.param(m, marks=getattr(pytest.mark, m), id=m) for m in sorted(PICTURED)])
def test_each_slice_draws_a_disagreement(zoo, model):
    handle = zoo.model(model)
    spec = load_model_spec(model)
    case = next(c for c in planning.cases(spec) if c.network == PICTURED[model] and not c.slow and c.exporter == "torchscript")
    feeds = handle.feeds(case)
    reference = handle.reference(case)
    rng = np.random.default_rng(0)
    actual = {k: (v + 0.05 * np.abs(v).max() * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
              for k, v in reference.items()}
    picture = handle.slice.disagreement_picture(case.network, feeds, reference, actual)
    assert picture is not None and picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[0] >= 256 and picture.shape[1] >= 256
    assert picture.std() > 5, "a blank picture shows nothing"
    same = handle.slice.disagreement_picture(case.network, feeds, reference, reference)
    assert same.shape[0] == picture.shape[0] and not np.array_equal(same, picture), "the drawing shows the difference"
