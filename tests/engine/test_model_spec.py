"""Baseline yaml parsing: cases, targets and floors come out as declared; bad yaml is named."""
from __future__ import annotations

import pytest

from tooling.model_spec import ModelSpecError, load_model_spec, model_names, parse_model_spec

MINIMAL = {
    "model": "toy",
    "networks": {
        "net": {
            "inputs": {"image": {"shape": ["batch", 3, "height", 8]}},
            "outputs": {"heat": {"atol": 1e-4, "rtol": 1e-4}},
            "opset": {"torchscript": 17, "dynamo": 18},
            "variants": {"plain": {}, "fancy": {"backends": ["onnxruntime"], "exporters": ["dynamo"]}},
        }
    },
    "profiles": {
        "smoke": {"dims": {"height": 16}, "batch_sizes": [1, 4], "exporters": ["torchscript", "dynamo"]},
        "deploy": {"dims": {"height": 256}, "batch_sizes": [8], "slow": True, "exclude_backends": ["aoti"]},
    },
    "accuracy": {"metric": "AP", "target": 0.677, "tolerance": 0.002, "higher_is_better": True},
    "throughput": {"unit": "fps", "items_per_call": ["batch"], "floors": {"310P3": {1: 7.72}}},
}


def test_cases_cover_profiles_batches_exporters_and_variants():
    spec = parse_model_spec(MINIMAL, "toy.yaml")
    ids = [c.id for c in spec.cases()]
    assert ids == [
        "net-smoke-b1-torchscript-plain", "net-smoke-b1-dynamo-plain", "net-smoke-b1-dynamo-fancy",
        "net-smoke-b4-torchscript-plain", "net-smoke-b4-dynamo-plain", "net-smoke-b4-dynamo-fancy",
        "net-deploy-b8-torchscript-plain",
    ]
    assert spec.cases()[-1].slow
    dynamo_only = [c.id for c in spec.cases(exporters=("dynamo",))]
    assert "net-deploy-b8-dynamo-plain" in dynamo_only and not any("torchscript" in i for i in dynamo_only)
    assert spec.networks["net"].inputs[0].concrete_shape({"batch": 2, "height": 16}) == (2, 3, 16, 8)
    assert not spec.networks["net"].variant("fancy").runs_on("openvino")
    assert spec.profiles["smoke"].runs_on("aoti") and not spec.profiles["deploy"].runs_on("aoti")


def test_accuracy_direction_and_throughput_units():
    spec = parse_model_spec(MINIMAL, "toy.yaml")
    assert spec.accuracy.passes(0.676) and not spec.accuracy.passes(0.674)
    lower = parse_model_spec({**MINIMAL, "accuracy": {**MINIMAL["accuracy"], "higher_is_better": False, "target": 46.6, "tolerance": 0.1}}, "toy.yaml")
    assert lower.accuracy.passes(46.7) and not lower.accuracy.passes(46.8)
    assert spec.throughput.items({"height": 16}, 4) == 4
    assert spec.throughput.floors == {"310P3": {1: 7.72}}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw.pop("networks"), "toy.yaml: missing required field 'networks'"),
        (lambda raw: raw["networks"]["net"]["outputs"].update(heat={"atol": "x"}), "outputs.heat: tolerance needs numeric"),
        (lambda raw: raw["networks"]["net"].update(exporter="tflite"), "exporter must be one of"),
    ],
)
def test_malformed_baseline_is_named(mutate, message):
    import copy

    raw = copy.deepcopy(MINIMAL)
    mutate(raw)
    with pytest.raises(ModelSpecError, match=message):
        parse_model_spec(raw, "toy.yaml")


def test_shipped_baselines_parse_and_name_their_slice():
    assert "videopose3d" in model_names()
    for name in model_names():
        spec = load_model_spec(name)
        assert spec.load_slice().name == name
        assert spec.cases(), f"{name} declares no case"
        for net in spec.networks.values():
            for golden in net.goldens:
                assert (spec.fixtures / "golden" / golden["file"]).is_file(), golden


def test_unknown_model_lists_known_ones():
    with pytest.raises(ModelSpecError, match=r"no baseline for model 'nope' \(known: .*videopose3d"):
        load_model_spec("nope")
