"""The agreement gate can fail on its metrics: per model, the agreement set's metrics (torch eager,
calibrated weights) are informative, and a small change to one weight tensor of the graph the
deployed backend runs makes the gate's metric half fail, naming the metric.

The torch eager reference is the same object the ``accuracy-agreement`` rows use in this process
(the ``agreement_references`` fixture), so these probes add one deployed pass per model.
"""
from __future__ import annotations

import math

import pytest

from tooling.agreement import perturb_initializer

# Metric -> open interval the torch eager pipeline must score strictly inside on the agreement set.
INFORMATIVE = {
    "transpose": {"AP": (0.2, 0.9), "AR": (0.2, 0.9)},
    "dekr": {"AP": (0.2, 0.9), "AR": (0.2, 0.9)},
    "gma": {"clean_1px": (5.0, 95.0), "final_1px": (5.0, 95.0), "clean_3px": (0.0, 100.0),
            "final_3px": (0.0, 100.0), "clean_5px": (0.0, 100.0), "final_5px": (0.0, 100.0)},
    "fomm": {"AKD": (0.0, math.inf), "MKR": (0.0, 1.0), "L1": (0.0, 1.0)},
}
# Per model: (network, one initializer of its exported graph, relative change, the metrics of which
# at least one must move past its bound, by MARGIN times it). The exporter's wrapper names parameters
# network.<state_dict key>; a convolution folded with its batch norm loses its name and is picked by
# its (unique) shape: DEKR's offset readout, transition_offset (255 x 480 x 1 x 1). A metric moves
# when a keypoint or a pixel's flow crosses a threshold, so a small change may move it by chance
# or not at all: TransPose's readout at 5 % moved AP 0.011 (seed 0) or nothing (seed 1); at 20 % AR
# moved >= 0.06 for each of seeds 0-4. FOMM's generator readout at 10 %: AKD 1.76, MKR 0.056.
PERTURBATIONS = {
    "videopose3d": ("vp3d", "network.shrink.weight", 0.05, ("mpjpe_p1_mm",)),
    "transpose": ("transpose_r", "network.final_layer.weight", 0.2, ("AP", "AR")),
    "dekr": ("hrnet_dekr", (255, 480, 1, 1), 0.05, ("AP", "AR")),
    "gma": ("gma", "network.update_block.flow_head.conv2.bias", 0.05, ("clean_1px", "final_1px")),
    "fomm": ("generator", "network.final.weight", 0.1, ("AKD", "MKR")),
}
DEPLOYED = "onnxruntime"
# The probe's move must clear the bound by this factor (on one of the named metrics at least), so
# that it shows the gate failing, not a move that happens to graze the bound.
MARGIN = 3.0


def _param(model: str):
    return pytest.param(model, marks=(getattr(pytest.mark, model), pytest.mark.accuracy), id=model)


@pytest.mark.parametrize("model", [_param(m) for m in INFORMATIVE])
def test_agreement_set_metrics_are_informative(agreement_references, tmp_path, model):
    agreement = agreement_references(model)
    reference = agreement.reference(tmp_path)
    print(f"{model} agreement set on torch eager ({agreement.weights_label}): {reference}")
    outside = {name: reference[name] for name, (low, high) in INFORMATIVE[model].items()
               if not low < reference[name] < high}
    assert not outside, f"{model}: agreement-set metrics outside their informative ranges {INFORMATIVE[model]}: {outside}"
    for name in agreement.spec.accuracy.agreement:
        assert math.isfinite(reference[name]), f"{model}: {name} = {reference[name]} on the agreement set"


@pytest.mark.parametrize("model", [_param(m) for m in PERTURBATIONS])
def test_perturbed_deployed_weight_fails_the_metric_half(zoo, agreement_references, tmp_path, model, monkeypatch):
    network, initializer, relative, metrics = PERTURBATIONS[model]
    agreement = agreement_references(model)
    probe = agreement.probe()
    export = probe.handle.onnx
    changes = []

    def perturbed(case, *args, **kwargs):
        path = export(case, *args, **kwargs)
        if case.network != network:
            return path
        target = tmp_path / f"{network}-{len(changes)}.onnx"
        changes.append(perturb_initializer(path, target, initializer, relative))
        return target

    monkeypatch.setattr(probe.handle, "onnx", perturbed)
    result = probe.run(zoo, DEPLOYED, tmp_path)
    failure = result.failure()
    print(f"{model}: {initializer} x (1 + {relative} N(0,1)) (relative L2 change {changes}):\n{failure}")
    assert changes, f"{model}: the deployed pass loaded no {network} graph to perturb"
    assert failure is not None and any(p.split(":")[0] in metrics for p in result.metric_problems), (
        f"{model}: perturbing {initializer} by {relative:.0%} left {metrics} within their agreement bounds "
        f"({result.deltas}); the metric half of the gate could not fail"
    )
    assert f"metric moved on {DEPLOYED}: " in failure.splitlines()[0]
    bounds = agreement.spec.accuracy.agreement
    clear = {m: result.deltas[m] / bounds[m] for m in metrics}
    assert max(clear.values()) >= MARGIN, (
        f"{model}: {metrics} moved only {clear} times their agreement bounds (want one at {MARGIN}x or more)"
    )
