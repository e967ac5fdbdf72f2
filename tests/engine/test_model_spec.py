"""Baseline yaml parsing: cases, targets and floors come out as declared; bad yaml is named."""
from __future__ import annotations

import re
import shutil

import pytest
import yaml

from tooling import fingerprint, planning
from tooling.baseline import BASELINES_DIR, load_model_spec, model_names, parse_model_spec, validate_baseline
from tooling.model_spec import ModelSpecError
from tooling.workspace import EXPORT_CODE

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
    "throughput": {"unit": "fps", "items_per_call": ["batch"], "floors": {"310P3": {"smoke": {1: 7.72}}}},
}


def test_cases_cover_profiles_batches_exporters_and_variants():
    spec = parse_model_spec(MINIMAL, "toy.yaml")
    ids = [c.id for c in planning.cases(spec)]
    assert ids == [
        "net-smoke-b1-torchscript-plain", "net-smoke-b1-dynamo-plain", "net-smoke-b1-dynamo-fancy",
        "net-smoke-b4-torchscript-plain", "net-smoke-b4-dynamo-plain", "net-smoke-b4-dynamo-fancy",
        "net-deploy-b8-torchscript-plain",
    ]
    assert planning.cases(spec)[-1].slow
    dynamo_only = [c.id for c in planning.cases(spec, exporters=("dynamo",))]
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
    assert spec.throughput.floor("310P3", "smoke", 1) == 7.72


def test_floors_apply_only_at_the_shape_the_guide_measured():
    """A floor is the guide's figure at one shape: another profile at the same batch is not gated."""
    spec = parse_model_spec(MINIMAL, "toy.yaml")
    assert spec.throughput.floor("310P3", "deploy", 1) is None  # same batch, other shape
    assert spec.throughput.floor("310P3", "smoke", 4) is None
    assert spec.throughput.floor("T4", "smoke", 1) is None
    vp3d = load_model_spec("videopose3d")
    assert vp3d.throughput.floor("310P3", "deploy", 2) == 280257
    assert vp3d.throughput.floor("310P3", "smoke", 2) is None  # 400 frames: the guide measured 6115
    assert not load_model_spec("dekr").throughput.floors  # a dataset-wide mean over five buckets


@pytest.mark.parametrize(("floors", "message"), [
    ({"310P3": {1: 7.72}}, r"throughput\.floors\.310P3"),  # a batch where the shape belongs
    ({"310P3": {"bucket": {1: 7.72}}}, r"throughput\.floors\.310P3: unknown profile 'bucket'"),
    ({"310P3": {"deploy": {2: 7.72}}}, r"throughput\.floors\.310P3\.deploy: unknown batch size .* 2 \(known: 8\)"),
])
def test_malformed_floors_are_named(floors, message):
    raw = {**MINIMAL, "throughput": {**MINIMAL["throughput"], "floors": floors}}
    with pytest.raises(ModelSpecError, match=message):
        parse_model_spec(raw, "toy.yaml")


def test_backend_tolerances_resolve_by_setting_then_backend_then_network():
    decoded = {"points": {"atol": 0.5, "rtol": 0.0}}
    raw = {**MINIMAL, "networks": {"net": {**MINIMAL["networks"]["net"], "decoded": decoded}},
           "backend_tolerances": {"om": {"heat": {"atol": 1e-2, "rtol": 0}},
                                  "om@force_fp16": {"heat": {"atol": 5e-2, "rtol": 0}, "points": {"atol": 2, "rtol": 0}}}}
    spec = parse_model_spec(raw, "toy.yaml")
    assert spec.tolerance("net", "heat", "om@force_fp16").atol == 5e-2
    assert spec.tolerance("net", "heat", "om@force_fp32").atol == 1e-2  # no entry for that mode: om's
    assert spec.tolerance("net", "heat", "onnxruntime").atol == 1e-4
    assert spec.decoded_tolerance("net", "points", "om@force_fp16").atol == 2
    assert spec.decoded_tolerance("net", "points", "om@force_fp32").atol == 0.5
    raw["backend_tolerances"]["om@force_fp16"]["heatmap"] = {"atol": 1, "rtol": 0}
    with pytest.raises(ModelSpecError, match=r"backend_tolerances\.om@force_fp16: unknown output 'heatmap'"):
        parse_model_spec(raw, "toy.yaml")
    raw["backend_tolerances"] = {"ov@f32": {"heat": {"atol": 1, "rtol": 0}}}
    with pytest.raises(ModelSpecError, match=r"backend_tolerances: unknown backend 'ov'"):
        parse_model_spec(raw, "toy.yaml")


def test_agreement_bounds_resolve_by_setting_then_backend_and_the_loosest_network_wins():
    om = {"output": "toy-bs{batch}"}
    networks = {
        "net": {**MINIMAL["networks"]["net"], "om": {**om, "precision_mode": "force_fp16"}},
        "head": {**MINIMAL["networks"]["net"], "om": {**om, "precision_mode": "must_keep_origin_dtype"}},
    }
    accuracy = {**MINIMAL["accuracy"], "agreement": {"AP": 0.01, "AR": 0.01},
                "agreement_by_backend": {"om@force_fp16": {"AP": 0.05}, "om": {"AP": 0.02, "AR": 0.03}}}
    spec = parse_model_spec({**MINIMAL, "networks": networks, "accuracy": accuracy}, "toy.yaml")
    # net holds om to om@force_fp16 (AP 0.05), head to om@must_keep_origin_dtype, which falls back
    # to om's entry (AP 0.02, AR 0.03): the set runs both, so each metric takes the looser bound.
    assert planning.agreement_bounds(spec, "om") == {"AP": 0.05, "AR": 0.03}
    assert planning.agreement_bounds(spec, "onnxruntime") == {"AP": 0.01, "AR": 0.01}
    only_fp16 = {**accuracy, "agreement_by_backend": {"om@force_fp16": {"AP": 0.05}}}
    spec = parse_model_spec({**MINIMAL, "networks": networks, "accuracy": only_fp16}, "toy.yaml")
    assert planning.agreement_bounds(spec, "om") == {"AP": 0.05, "AR": 0.01}  # AR: not replaced

    typo = {**accuracy, "agreement_by_backend": {"om@force_fp16": {"APP": 0.05}}}
    with pytest.raises(ModelSpecError, match=r"accuracy\.agreement_by_backend\.om@force_fp16: unknown agreement metric 'APP'"):
        parse_model_spec({**MINIMAL, "networks": networks, "accuracy": typo}, "toy.yaml")
    stray = {**accuracy, "agreement_by_backend": {"ov": {"AP": 0.05}}}
    with pytest.raises(ModelSpecError, match=r"accuracy\.agreement_by_backend: unknown backend 'ov'"):
        parse_model_spec({**MINIMAL, "networks": networks, "accuracy": stray}, "toy.yaml")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw.pop("networks"), "(?s)toy.yaml: .*missing required field 'networks'"),
        (lambda raw: raw["networks"]["net"]["outputs"].update(heat={"atol": "x"}),
         r"networks\.net\.outputs\.heat\.atol: 'x' is not of type 'number'"),
        (lambda raw: raw["networks"]["net"].update(exporter="tflite"), r"networks\.net\.exporter: 'tflite' is not one of"),
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
        assert planning.cases(spec), f"{name} declares no case"
        for net in spec.networks.values():
            for golden in net.goldens:
                assert (spec.fixtures / "golden" / golden["file"]).is_file(), golden


def test_unknown_model_lists_known_ones():
    with pytest.raises(ModelSpecError, match=r"no baseline for model 'nope' \(known: .*videopose3d"):
        load_model_spec("nope")


# -- the strict schema (tooling/schema.py) ---------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, message",
    [
        # A typo must not silently drop a setting (this one would put AOTInductor into the CPU tier).
        (lambda raw: raw["profiles"]["deploy"].update(exclude_backend=["aoti"]),
         r"unknown key profiles\.deploy\.exclude_backend \(allowed here: .*exclude_backends"),
        (lambda raw: raw.update(acuracy={}), r"unknown key acuracy "),
        (lambda raw: raw["networks"]["net"]["variants"]["fancy"].update(backend=["om"]),
         r"unknown key networks\.net\.variants\.fancy\.backend "),
        (lambda raw: raw["networks"]["net"]["outputs"]["heat"].update(atoll=1.0), r"unknown key networks\.net\.outputs\.heat\.atoll"),
        (lambda raw: raw["throughput"]["floors"]["310P3"]["smoke"].update(b4=1.0),
         r"throughput\.floors\.310P3\.smoke: key 'b4' is not allowed"),
    ],
)
def test_unknown_or_mistyped_key_names_file_and_key_path(mutate, message):
    import copy

    raw = copy.deepcopy(MINIMAL)
    mutate(raw)
    with pytest.raises(ModelSpecError, match=r"^baselines/toy\.yaml: 1 problem") as info:
        parse_model_spec(raw, "baselines/toy.yaml")
    assert re.search(message, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw["profiles"]["deploy"].update(exclude_backends=["aotii"]),
         r"profiles\.deploy\.exclude_backends: unknown backend 'aotii' \(known: .*aoti"),
        (lambda raw: raw["profiles"]["deploy"].update(nightly_backends=["aotii"]),
         r"profiles\.deploy\.nightly_backends: unknown backend 'aotii' \(known: .*aoti"),
        (lambda raw: raw["networks"]["net"]["variants"]["fancy"].update(backends=["onnxrt"]),
         r"networks\.net\.variants\.fancy\.backends: unknown backend 'onnxrt'"),
        (lambda raw: raw["networks"]["net"]["variants"]["fancy"].update(exporters=["jit"]),
         r"variants\.fancy\.exporters: unknown exporter 'jit'"),
        (lambda raw: raw["accuracy"].update(profile="smok"), r"accuracy\.profile: unknown profile 'smok'"),
        (lambda raw: raw["profiles"]["smoke"].update(networks=["nett"]), r"profiles\.smoke\.networks: unknown network 'nett'"),
        (lambda raw: raw["profiles"]["smoke"].update(exporters=["onnx"]), r"profiles\.smoke\.exporters: unknown exporter"),
        (lambda raw: raw.update(backend_tolerances={"openvino": {"heta": {"atol": 1, "rtol": 0}}}),
         r"backend_tolerances\.openvino: unknown output 'heta'"),
        (lambda raw: raw.update(backend_tolerances={"ov": {"heat": {"atol": 1, "rtol": 0}}}),
         r"backend_tolerances: unknown backend 'ov'"),
        (lambda raw: raw.update(backend_options={"onnxruntim": {}}), r"backend_options: unknown backend 'onnxruntim'"),
        (lambda raw: raw["throughput"].update(items_per_call=["batch", "frames"]),
         r"throughput\.items_per_call: unknown dim 'frames'"),
        (lambda raw: raw["networks"]["net"].update(dynamic_axes={"imgae": {0: "batch"}}),
         r"networks\.net\.dynamic_axes: unknown input or output 'imgae'"),
    ],
)
def test_dangling_cross_reference_is_named(mutate, message):
    import copy

    raw = copy.deepcopy(MINIMAL)
    mutate(raw)
    with pytest.raises(ModelSpecError) as info:
        parse_model_spec(raw, "baselines/toy.yaml")
    assert re.search(message, str(info.value)), str(info.value)


PIN = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    "upstream, message",
    [
        ({"other": {"commit": PIN}}, r"upstream\.other: a checkout is named 'toy' or 'toy-<suffix>'"),
        ({"toy": {"commit": PIN, "networks": ["nett"]}}, r"upstream\.toy\.networks: unknown network 'nett'"),
        ({"toy": {"commit": PIN, "networks": ["net"]}, "toy-b": {"commit": PIN, "networks": ["net"]}},
         r"upstream\.toy-b\.networks: 'net' is already built from upstream\.toy"),
        ({"toy": {"commit": PIN}, "toy-b": {"commit": PIN}}, r"upstream: toy, toy-b all omit networks"),
        ({"toy": {"repository": "x"}}, r"upstream\.toy: missing required field 'commit'"),
        ({"toy": {"commit": "3d152de"}}, r"upstream\.toy\.commit"),
    ],
)
def test_malformed_upstream_checkouts_are_named(upstream, message):
    import copy

    raw = copy.deepcopy(MINIMAL)
    raw["upstream"] = upstream
    with pytest.raises(ModelSpecError) as info:
        parse_model_spec(raw, "baselines/toy.yaml")
    assert re.search(message, str(info.value)), str(info.value)


def test_a_model_may_pin_several_upstream_checkouts():
    import copy

    raw = copy.deepcopy(MINIMAL)
    raw["networks"]["scorer"] = copy.deepcopy(raw["networks"]["net"])
    raw["upstream"] = {"toy": {"commit": PIN, "requires": ["yacs"]},
                       "toy-scorer": {"repository": "https://example.invalid/s.git", "commit": PIN, "networks": ["scorer"]}}
    assert set(parse_model_spec(raw, "toy.yaml").upstream) == {"toy", "toy-scorer"}


def test_every_problem_is_listed_at_once():
    import copy

    raw = copy.deepcopy(MINIMAL)
    raw["profiles"]["smoke"]["slowww"] = True
    raw["accuracy"]["targett"] = 1
    with pytest.raises(ModelSpecError, match="2 problem") as info:
        parse_model_spec(raw, "toy.yaml")
    assert "profiles.smoke.slowww" in str(info.value) and "accuracy.targett" in str(info.value)


def test_every_shipped_baseline_validates():
    for name in model_names():
        raw = yaml.safe_load((BASELINES_DIR / f"{name}.yaml").read_text())
        validate_baseline(raw, f"{name}.yaml")  # raises, naming each problem, if not


def test_a_typo_in_a_baseline_file_names_that_file(tmp_path, monkeypatch):
    text = (BASELINES_DIR / "videopose3d.yaml").read_text().replace("benchmark_rounds: 3", "benchmark_round: 3")
    (tmp_path / "videopose3d.yaml").write_text(text)
    monkeypatch.setattr("tooling.baseline.BASELINES_DIR", tmp_path)
    load_model_spec.cache_clear()
    try:
        with pytest.raises(ModelSpecError, match=rf"(?s){re.escape(str(tmp_path))}/videopose3d\.yaml: .*"
                           r"unknown key profiles\.deploy\.benchmark_round "):
            load_model_spec("videopose3d")
    finally:
        load_model_spec.cache_clear()


@pytest.fixture
def engine_copy(tmp_path, monkeypatch):
    """A copy of the engine's sources that content digests read instead of the real ones."""
    root = tmp_path / "tooling"
    shutil.copytree(fingerprint.ENGINE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "ENGINE_ROOT", root)
    fingerprint._closure.cache_clear()
    yield root
    fingerprint._closure.cache_clear()


def test_an_edit_to_a_backend_module_changes_no_models_onnx_artifact_key(engine_copy):
    """ONNX artifacts are keyed by the slice's and the export code's sources (ModelHandle.port_digest):
    the spec layer imports no backend, so editing any backend re-exports no model's graph."""
    def port_digests() -> dict[str, str]:
        fingerprint._closure.cache_clear()
        return {name: fingerprint.source_digest(load_model_spec(name).slice_module, *EXPORT_CODE) for name in model_names()}

    before = port_digests()
    for backend_file in (engine_copy / "backends").glob("*.py"):
        backend_file.write_text(backend_file.read_text() + "\n# edited\n")
    assert port_digests() == before
    (engine_copy / "export.py").write_text((engine_copy / "export.py").read_text() + "\n# edited\n")
    after_export_edit = port_digests()
    assert all(after_export_edit[name] != before[name] for name in before)  # the digest does see edits
