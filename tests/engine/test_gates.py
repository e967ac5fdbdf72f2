"""The gate registry (tooling/gates.py): every suite test declares its gate, parametrizations
follow the yaml (including a profile's exclude_backends), and labels come from the registry."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest

from tooling import planning
from tooling.baseline import parse_model_spec
from tooling.conformance import ConformanceSuite
from tooling.gates import GATES, GateContext, gate, gate_of, serving_backends

TOY = {
    "model": "toy",
    "networks": {
        "net": {
            "inputs": {"image": {"shape": ["batch", 3, "height", 8]}},
            "outputs": {"heat": {"atol": 1e-4, "rtol": 1e-4}},
            "decoded": {"peaks": {"atol": 1e-4, "rtol": 1e-4}},
            "opset": {"torchscript": 17},
        }
    },
    "profiles": {
        "smoke": {"dims": {"height": 16}, "batch_sizes": [1], "exclude_backends": ["aoti"]},
        "deploy": {"dims": {"height": 256}, "batch_sizes": [8], "slow": True},
    },
    "accuracy": {"metric": "AP", "target": 0.5, "higher_is_better": True, "profile": "smoke"},
    "throughput": {"unit": "fps"},
}


def context(raw=TOY, **options) -> GateContext:
    spec = parse_model_spec(copy.deepcopy(raw), "toy.yaml")
    defaults = {"exporters": None, "selected_backends": ("onnxruntime", "openvino", "aoti"), "accuracy_backend": None}
    return GateContext(spec=spec, cases=planning.cases(spec), **{**defaults, **options})


def ids(params) -> list[str]:
    return [p.id for p in params]


def test_every_suite_test_declares_a_registered_gate_once():
    tests = {name: fn for name, fn in inspect.getmembers(ConformanceSuite, inspect.isfunction) if name.startswith("test_")}
    labels = [gate_of(fn).label if gate_of(fn) else f"{name}: no @gate" for name, fn in tests.items()]
    assert sorted(labels) == sorted(GATES), "each registered gate is implemented by exactly one suite test"


def test_an_unregistered_gate_label_is_refused_at_import_time():
    with pytest.raises(KeyError, match="no gate 'acuracy'"):
        gate("acuracy")


def test_accuracy_rows_honour_the_profiles_exclude_backends():
    _, params = GATES["accuracy"].parametrize(context(accuracy_backend="all"))
    assert ids(params) == ["onnxruntime", "openvino"]  # aoti excluded by profile smoke
    raw = copy.deepcopy(TOY)
    raw["accuracy"]["profile"] = "deploy"
    _, params = GATES["accuracy"].parametrize(context(raw, accuracy_backend="all"))
    assert ids(params) == ["onnxruntime", "openvino", "aoti"]


def test_a_staged_pass_runs_on_one_backend_by_default_or_on_the_reference():
    assert ids(GATES["accuracy"].parametrize(context())[1]) == ["onnxruntime"]
    assert ids(GATES["accuracy"].parametrize(context(available=lambda name: name == "openvino"))[1]) == ["openvino"]
    assert ids(GATES["accuracy"].parametrize(context(accuracy_backend="torch"))[1]) == ["torch"]


def test_an_excluded_accuracy_backend_asked_for_by_name_is_skipped_with_the_reason():
    _, params = GATES["accuracy"].parametrize(context(accuracy_backend="aoti"))
    (param,) = params
    (mark,) = param.marks
    assert mark.name == "skip" and "profile smoke is not served by it" in mark.kwargs["reason"]


def test_deployed_rows_follow_cases_and_backends_and_carry_slow():
    argnames, params = GATES["deployed-vs-onnx"].parametrize(context())
    assert argnames == ("case", "deployed_backend")
    assert ids(params) == [
        "net-smoke-b1-torchscript-onnxruntime", "net-smoke-b1-torchscript-openvino",
        "net-deploy-b8-torchscript-onnxruntime", "net-deploy-b8-torchscript-openvino", "net-deploy-b8-torchscript-aoti",
    ]
    assert [m.name for m in params[-1].marks] == ["slow"]
    assert GATES["deployed-vs-onnx"].backend_arg == "deployed_backend"


def test_upstream_rows_cover_each_network_an_upstream_builds_at_its_first_case():
    """A network no profile deploys is compared at batch 1 with the dims of the first profile that
    sets them all; a network no checkout builds has no row; no upstream pinned, no rows."""
    raw = copy.deepcopy(TOY)
    raw["networks"]["scorer"] = {"inputs": {"crop": {"shape": ["batch", 3, "box", "box"]}},
                                 "outputs": {"score": {"atol": 1e-5, "rtol": 1e-5}}, "opset": {"torchscript": 17}}
    raw["networks"]["helper"] = copy.deepcopy(raw["networks"]["scorer"])
    for profile in raw["profiles"].values():
        profile["networks"] = ["net"]
    raw["profiles"]["deploy"]["dims"]["box"] = 24
    pin = "0" * 40
    raw["upstream"] = {"toy": {"commit": pin, "networks": ["net"]}, "toy-scorer": {"commit": pin, "networks": ["scorer"]}}
    _, params = GATES["port-vs-upstream"].parametrize(context(raw))
    assert ids(params) == ["net-smoke-b1-torchscript", "scorer-dims:box=24-b1-torchscript"]
    del raw["upstream"]
    assert GATES["port-vs-upstream"].parametrize(context(raw))[1] == []


def test_the_readme_gate_table_lists_exactly_the_registered_gates_in_order():
    """The README's table of gates is the user's view of the registry: every label a row can carry
    (a relabelled row's too, such as accuracy-oracle), once each, in registry order."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| gate | what it proves |", 1)[1].split("\n\n", 1)[0]
    listed = [line.split("|")[1].strip().strip("`") for line in table.strip().splitlines()[1:]]
    registered = [label for g in GATES.values() for label in (g.label, *g.shown_as)]
    assert listed == registered


def test_each_gate_applies_its_own_markers_to_its_test():
    tests = [fn for _, fn in inspect.getmembers(ConformanceSuite, inspect.isfunction) if gate_of(fn)]
    for fn in tests:
        marks = {m.name for m in getattr(fn, "pytestmark", [])}
        assert marks == set(gate_of(fn).markers), fn.__name__


def test_serving_backends_apply_the_gates_kind_of_backend_and_the_backends_option():
    ctx = context(selected_backends=None)
    case = next(c for c in ctx.cases if c.profile == "deploy")
    cpu = ctx.serving_backends(case, "cpu-speedup")
    device = ctx.serving_backends(case, "throughput")
    assert "onnxruntime" in cpu and "om" not in cpu and "om" in device and "onnxruntime" not in device
    assert set(ctx.serving_backends(case, "deployed-vs-onnx")) == set(cpu) | set(device)
    assert context(selected_backends=("openvino",)).serving_backends(case, "deployed-vs-onnx") == ["openvino"]
    smoke = next(c for c in ctx.cases if c.profile == "smoke")
    assert "aoti" in cpu and "aoti" not in ctx.serving_backends(smoke, "cpu-speedup")  # profile excludes it


def test_nightly_only_rows_are_slow_and_leave_the_cpu_tiers_speed_gate():
    """A profile's nightly_backends and a torch-compiling backend at a second exporter put those
    rows in the nightly tier; the row on the same artifact at the default exporter, and every
    other backend's row, stay in the CPU tier; the speed gate times nightly-only backends only in
    a run that holds the nightly tier."""
    raw = copy.deepcopy(TOY)
    raw["profiles"] = {
        "smoke": {"dims": {"height": 16}, "batch_sizes": [1], "exporters": ["torchscript", "dynamo"]},
        "smoke_batched": {"dims": {"height": 16}, "batch_sizes": [4], "nightly_backends": ["aoti"]},
    }
    ctx = context(raw)
    _, params = GATES["deployed-vs-onnx"].parametrize(ctx)
    slow = {p.id for p in params if any(m.name == "slow" for m in p.marks)}
    assert slow == {"net-smoke-b1-dynamo-aoti", "net-smoke_batched-b4-torchscript-aoti"}
    assert {"net-smoke-b1-torchscript-aoti", "net-smoke-b1-dynamo-onnxruntime",
            "net-smoke_batched-b4-torchscript-openvino"} <= set(ids(params)) - slow
    batched = next(c for c in ctx.cases if c.profile == "smoke_batched")
    assert "aoti" not in serving_backends(ctx.spec, batched, GATES["cpu-speedup"], nightly=False)
    assert "aoti" in serving_backends(ctx.spec, batched, GATES["cpu-speedup"], nightly=True)
    dynamo = next(c for c in ctx.cases if c.exporter == "dynamo")
    # --exporter dynamo chose the exporter: its row on the torch-compiling backend is the CPU tier's.
    assert not planning.nightly_only(ctx.spec, dynamo, "aoti", exporters=("dynamo",))
    assert planning.nightly_only(ctx.spec, dynamo, "aoti") and not planning.nightly_only(ctx.spec, dynamo, "openvino")


def test_the_cpu_tier_times_each_profile_at_its_first_batch_size():
    raw = copy.deepcopy(TOY)
    raw["profiles"]["smoke"]["batch_sizes"] = [1, 2]
    _, params = GATES["cpu-speedup"].parametrize(context(raw))
    slow = {p.id for p in params if any(m.name == "slow" for m in p.marks)}
    assert set(ids(params)) == {"net-smoke-b1-torchscript", "net-smoke-b2-torchscript", "net-deploy-b8-torchscript"}
    assert slow == {"net-smoke-b2-torchscript", "net-deploy-b8-torchscript"}


def test_agreement_on_a_torch_compiling_backend_is_nightly_where_the_slice_calibrates(monkeypatch):
    """AOTInductor freezes weights into its package: calibrated agreement weights would compile the
    network a second time in the CPU tier, so that row is nightly; seeded agreement reuses the
    package deployed-vs-onnx built, and stays."""
    from tooling.baseline import load_model_spec

    def slow_rows(model: str) -> set[str]:
        spec = load_model_spec(model)
        ctx = GateContext(spec=spec, cases=planning.cases(spec), exporters=None, selected_backends=None,
                          accuracy_backend=None)
        _, params = GATES["accuracy-agreement"].parametrize(ctx)
        return {p.id for p in params if any(m.name == "slow" for m in p.marks)}

    assert slow_rows("transpose") == {"aoti", "aoti-cuda"}  # calibrates its agreement weights
    assert slow_rows("videopose3d") == set()  # seeded: the smoke package serves its calls
