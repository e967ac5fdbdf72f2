"""Comparison: combined tolerance, statistics, and a failure message that localises the error."""
from __future__ import annotations

import numpy as np
import pytest

from tooling.compare import ComparisonError, assert_outputs_match, compare_array
from tooling.model_spec import Tolerance

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def test_combined_bound_accepts_small_relative_and_small_absolute_errors():
    expected = np.array([0.0, 1e-6, 100.0, -5.0], np.float32)
    actual = expected + np.array([5e-5, 9e-5, 0.09, -4e-3], np.float32)
    stats = compare_array("y", actual, expected, TOL)
    assert stats.passed and stats.violations == 0
    assert stats.max_rel > 1  # near-zero outputs: huge relative error, still within atol


def test_failure_names_output_worst_element_and_statistics():
    expected = np.zeros((2, 3, 4), np.float32)
    actual = expected.copy()
    actual[1, 2, 3] = 0.5
    with pytest.raises(ComparisonError) as info:
        assert_outputs_match({"heat": actual, "off": expected}, {"heat": expected, "off": expected},
                             {"heat": TOL, "off": TOL}, "case-1: onnxruntime vs ONNX")
    message = str(info.value)
    assert message.startswith("case-1: onnxruntime vs ONNX: heat out of tolerance")
    assert "worst@(1, 2, 3): got 0.5 want 0" in message and "max_abs=0.5" in message
    assert "ok   off" in message


def test_nan_where_a_number_is_expected_fails():
    stats = compare_array("y", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), TOL)
    assert not stats.passed and stats.worst_index == (0,)


def test_shape_mismatch_and_missing_output_are_errors():
    with pytest.raises(ComparisonError, match=r"y: shape \(3,\) differs from expected \(4,\)"):
        compare_array("y", np.zeros(3), np.zeros(4), TOL)
    with pytest.raises(ComparisonError, match="outputs missing"):
        assert_outputs_match({}, {"y": np.zeros(1)}, {"y": TOL}, "x")


def test_cosine_floor_catches_scaled_outputs():
    expected = np.linspace(-1, 1, 100)
    stats = compare_array("y", -expected, expected, Tolerance(10.0, 0.0, min_cosine=0.99))
    assert stats.violations == 0 and not stats.passed and stats.cosine == pytest.approx(-1)


def test_absolute_bound_can_scale_with_the_output_range():
    expected = np.array([3.0e4, -2.0e4, 0.5])
    actual = expected + np.array([0.5, -0.5, 0.5])
    assert not compare_array("y", actual, expected, Tolerance(1e-3, 1e-6)).passed
    assert compare_array("y", actual, expected, Tolerance(1e-3, 1e-6, atol_of_max=2e-5)).passed


def test_max_fraction_out_allows_that_many_elements_past_the_bound_but_never_a_non_finite_one():
    expected = np.full(20, 100.0, np.float32)
    actual = expected.copy()
    actual[:2] = 140.0  # two argmax flips out of twenty coordinates
    assert not compare_array("p", actual, expected, Tolerance(4.0, 0.0)).passed
    assert compare_array("p", actual, expected, Tolerance(4.0, 0.0, max_fraction_out=0.1)).passed
    assert not compare_array("p", actual, expected, Tolerance(4.0, 0.0, max_fraction_out=0.05)).passed
    actual[0] = np.inf
    with np.errstate(invalid="ignore"):  # the cosine of an infinite vector is nan
        assert not compare_array("p", actual, expected, Tolerance(4.0, 0.0, max_fraction_out=0.5)).passed
