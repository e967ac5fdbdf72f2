"""Chained networks (yaml ``chains:``), golden variants, and what reaches an artifact's dims."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from tooling import planning
from tooling.baseline import BASELINES_DIR, load_model_spec, parse_model_spec, validate_baseline
from tooling.cli import main
from tooling.locations import Roots
from tooling.model_spec import FIXTURES_DIR, ChainCase, ModelSpecError
from tooling.workspace import Options, Workspace

pytestmark = pytest.mark.fomm  # the chain machinery is exercised on FOMM's baseline
FOMM_RAW = yaml.safe_load((BASELINES_DIR / "fomm.yaml").read_text())


def _edited(edit) -> dict:
    raw = copy.deepcopy(FOMM_RAW)
    edit(raw)
    return raw


def test_chain_cases_follow_profiles_and_backends():
    spec = load_model_spec("fomm")
    smoke = ChainCase("reconstruction", "smoke", 1, False)
    assert smoke in planning.chain_cases(spec)
    # A profile that builds only one member network holds no chain case.
    assert not [c for c in planning.chain_cases(spec) if c.profile.startswith("deploy_")]
    assert planning.chain_member(spec, smoke, "generator", "onnxruntime").variant == "grid_sample"
    assert planning.chain_member(spec, smoke, "generator", "om").variant == "gather"
    assert planning.chain_runs_on(spec, smoke, "openvino")
    assert not planning.chain_runs_on(spec, smoke, "aoti")  # the smoke profile excludes it
    # The backend override (the yaml's fp16 entry), not the chain's own fp32 bound.
    fp16 = spec.backend_tolerances["om@force_fp16"]["prediction"]
    assert spec.chain_tolerance("reconstruction", "prediction", "om@force_fp16") == fp16 and fp16.atol > 1e-4
    assert spec.chain_tolerance("reconstruction", "prediction").atol == 1e-4


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["chains"]["reconstruction"].update(networks=["kp_detector", "refiner"]), "unknown network 'refiner'"),
    (lambda r: r["chains"]["reconstruction"].update(steps=2), r"unknown key chains\.reconstruction\.steps"),
    (lambda r: r["chains"]["reconstruction"].update(networks=["kp_detector"]), "networks"),
    (lambda r: r["networks"]["generator"]["goldens"][1].update(variant="patched"), "unknown variant 'patched'"),
])
def test_bad_chains_and_golden_variants_are_named(edit, message):
    with pytest.raises(ModelSpecError, match=message):
        raw = _edited(edit)
        validate_baseline(raw, "fomm.yaml")
        parse_model_spec(raw, "fomm.yaml")


def test_profile_dims_no_input_uses_stay_out_of_artifacts():
    """pose_box configures the slice's metric; the detector's artifact depends only on its input dims."""
    spec = load_model_spec("fomm")
    case = next(c for c in planning.cases(spec) if c.network == "kp_detector" and c.profile == "smoke")
    assert spec.dims(case) == {"height": 128, "width": 128, "batch": 1}


def test_chain_feeds_the_generator_from_the_detector(tmp_path):
    """The chain's generator receives exactly what the detector returned on the same backend."""
    handle = Workspace(Roots(None, None, None, tmp_path), Options(weights="seeded")).model("fomm")
    calls = []
    original = handle.slice.run_chain

    def spy(chain, run, feeds):
        def recording(network, network_feeds):
            out = run(network, network_feeds)
            calls.append((network, dict(network_feeds), out))
            return out
        return original(chain, recording, feeds)

    handle.slice.run_chain = spy
    try:
        result = handle.run_chain(ChainCase("reconstruction", "smoke", 1, False), "torch", served_by="onnxruntime")
    finally:
        del handle.slice.run_chain
    (_, _, kp_source), (_, _, kp_driving), (network, generator_feeds, _) = calls
    assert network == "generator"
    np.testing.assert_array_equal(generator_feeds["kp_driving_value"], kp_driving["value"])
    np.testing.assert_array_equal(generator_feeds["kp_source_jac"], kp_source["jacobian"])
    assert result["frame_uint8"].shape == (128, 128, 3) and result["frame_uint8"].dtype == np.uint8


@pytest.mark.parametrize(("network", "golden", "backend"), [
    ("kp_detector", "kp_detector_public.npz", "torch"),
    ("kp_detector", "kp_detector_public.npz", "onnxruntime"),
    ("generator", "generator_upstream_public.npz", "torch"),  # the yaml names its variant (unpatched upstream)
])
def test_verify_golden_picks_the_golden_variant(network, golden, backend, tmp_path):
    path = FIXTURES_DIR / "fomm" / "golden" / golden
    assert main(["verify-golden", "fomm", network, str(path), "--backend", backend, "--cache-dir", str(tmp_path)]) == 0
    assert main(["verify-golden", "fomm", "generator", str(FIXTURES_DIR / "fomm" / "golden" / "generator_public.npz"),
                 "--variant", "nonexistent"]) == 2


def test_extra_targets_keep_their_own_direction_and_tolerance():
    raw = _edited(lambda r: r["accuracy"].update(extra_targets={
        "MKR": {"target": 0.036, "tolerance": 0.0005}, "PCK": {"target": 0.9, "higher_is_better": True}, "L1": 0.07}))
    validate_baseline(raw, "fomm.yaml")
    accuracy = parse_model_spec(raw, "fomm.yaml").accuracy
    assert accuracy.passes_extra("MKR", 0.0364) and not accuracy.passes_extra("MKR", 0.0366)
    assert accuracy.passes_extra("PCK", 0.95) and not accuracy.passes_extra("PCK", 0.85)  # higher is better
    assert accuracy.passes_extra("L1", 0.074) and not accuracy.passes_extra("L1", 0.076)  # AKD's rule: lower, 0.005
