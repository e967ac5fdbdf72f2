"""The OM backend without an NPU: ATC commands against the guides' text, npu-smi parsing, the
ais_bench session adapter against a fake of its interface, and the error paths.

The expected ATC commands are the guides' own text (fixtures/om/<model>.yaml), never computed.
A fake ``atc`` (fixtures/om/fake_atc.py) and a fake ``ais_bench`` (fixtures/om/fake_ais_bench.py)
stand in for the CANN toolkit so that compile, cache, load and run go through the real code.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tooling import planning
from tooling.backends.base import BackendConfig, BackendError, CompileRequest
from tooling.backends.atc import ATC_RECORD, DEFAULT_PRECISION_MODE, OmSettings, atc_command
from tooling.backends.npu import NpuSmiError, parse_npu_smi_info
from tooling.backends.om import OmBackend
from tooling.backends.om_session import call_duration_ms
from tooling.backends.onnx_rewrites import ONNX_REWRITES, apply_onnx_rewrites, int64_to_int32
from tooling.baseline import BASELINES_DIR, load_model_spec, model_names, parse_model_spec
from tooling.cache import ArtifactCache, ArtifactKey
from tooling.compare import assert_outputs_match
from tooling.conformance import call_seconds
from tooling.locations import Roots
from tooling.model_spec import FIXTURES_DIR, Case, ModelSpecError
from tooling.workspace import Options, Workspace

OM_FIXTURES = FIXTURES_DIR / "om"
GUIDE_NPU_SMI = (OM_FIXTURES / "npu_smi_guide.txt").read_text()
GUIDE_CHIP = parse_npu_smi_info(GUIDE_NPU_SMI)[0]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


# -- specs ------------------------------------------------------------------------------------------
def make_spec(model: str, networks: dict, om: dict | None = None):
    """A ModelSpec with the boilerplate filled in, for networks described inline."""
    raw = {
        "model": model,
        "slice": "tooling.models.videopose3d",
        "networks": {name: {"opset": {"torchscript": 17}, **net} for name, net in networks.items()},
        "profiles": {"unit": {"dims": {}, "batch_sizes": [1]}},
        "throughput": {},
        "om": om or {},
    }
    return parse_model_spec(raw, f"inline {model}")


# -- ATC commands against the guides ----------------------------------------------------------------
def atc_flags(argv: list[str]) -> dict[str, str]:
    """ATC's flags as {--name: value}; paths reduced to their last component."""
    assert argv[0] == "atc", argv
    flags: dict[str, str] = {}
    for arg in argv[1:]:
        name, sep, value = arg.partition("=")
        assert name.startswith("--") and sep, f"ATC takes --flag=value, got {arg!r}"
        assert name not in flags, f"{name} given twice"
        # The ONNX file and the directories are the suite's own; the guide's do not apply.
        flags[name] = "<onnx>" if name == "--model" else value.rsplit("/", 1)[-1]
    return flags


def guide_flags(command: str, batch: int) -> dict[str, str]:
    """The guide's flags; a guide without --precision_mode ran ATC's default (force_fp16 for
    inference), which the suite writes out because the mode keys the artifact and tolerances."""
    text = command.replace("\\\n", " ").replace("${chip_name}", GUIDE_CHIP.name).replace("${bs}", str(batch))
    return {"--precision_mode": DEFAULT_PRECISION_MODE, **atc_flags(shlex.split(text))}


def guide_params(spec) -> list:
    """One param per guide command x batch size x dynamic-dims bucket of ``spec``'s model."""
    fixture = OM_FIXTURES / f"{spec.name}.yaml"
    if not fixture.is_file():
        return [pytest.param(spec, None, 0, {}, id=f"{spec.name}-no-guide-fixture")]
    params = []
    for entry in yaml.safe_load(fixture.read_text())["atc"]:
        dynamic = OmSettings.of(spec, entry["network"]).dynamic_dims
        buckets = dynamic.buckets if dynamic else [()]
        for batch in entry["batch_sizes"]:
            for bucket in buckets:
                dims = {**entry["dims"], **dict(zip(dynamic.dims if dynamic else (), bucket)), "batch": batch}
                label = "x".join(map(str, bucket)) or "static"
                label = f"{spec.name}-{entry['network']}-b{batch}-{label}"
                params.append(pytest.param(spec, entry, batch, dims, id=label))
    return params


def _baselines_with_om() -> list:
    specs = [load_model_spec(m) for m in model_names()]
    return [p for s in specs if s.om or any(n.om for n in s.networks.values()) for p in guide_params(s)]


def _check_against_guide(spec, entry, batch, dims):
    assert entry is not None, (
        f"baselines/{spec.name}.yaml has an om: section: copy the guide's ATC command to fixtures/om/{spec.name}.yaml"
    )
    argv = atc_command(spec, entry["network"], dims, model=Path("/cache/onnx/model.onnx"),
                       output_dir=Path("/cache/om/artifact"), soc_version=GUIDE_CHIP.soc_version)
    assert atc_flags(argv) == guide_flags(entry["command"], batch)


@pytest.mark.parametrize(("spec", "entry", "batch", "dims"), _baselines_with_om())
def test_atc_command_matches_guide(spec, entry, batch, dims):
    _check_against_guide(spec, entry, batch, dims)


def test_guide_comparison_notices_a_wrong_flag():
    raw = yaml.safe_load((BASELINES_DIR / "dekr.yaml").read_text())
    raw["networks"]["hrnet_dekr"]["om"]["input_format"] = "NCHW"  # the guide writes ND
    spec = parse_model_spec(raw, "dekr.yaml")
    entry = yaml.safe_load((OM_FIXTURES / "dekr.yaml").read_text())["atc"][0]
    argv = atc_command(spec, "hrnet_dekr", {"batch": 1}, model=Path("m.onnx"), output_dir=Path("out"),
                       soc_version="Ascend310")
    assert atc_flags(argv) != guide_flags(entry["command"], 1)


@pytest.mark.parametrize(("om", "message"), [
    # The baseline schema (tooling/schema.py) rejects unknown and malformed keys when the yaml is read;
    # OmSettings checks what depends on the merged model- and network-level sections.
    ({"output": "x", "precision": "fp16"}, "unknown key networks.net.om.precision"),
    ({"input_format": "ND"}, "missing required field 'output'"),
    ({"output": "x", "dynamic_dims": {"dims": ["height", "width"], "buckets": [[512]]}}, "one value per dim"),
    ({"output": "x", "files": {"keep_dtype": {"content": "OpType::InstanceNorm"}}},
     "networks.net.om.files.keep_dtype: missing required field 'name'"),
    # ATC takes 2..100 gears: a single one is a static OM, and ATC refuses it.
    ({"output": "x", "dynamic_dims": {"dims": ["height"], "buckets": [[512]]}}, "2 to 100 distinct gears, got 1"),
    ({"output": "x", "dynamic_dims": {"dims": ["height"], "buckets": [[h] for h in range(101)]}}, "got 101"),
    ({"output": "x", "precision_mode": "fp16"}, "not an ATC precision mode"),
    ({"output": "x", "flags": {"precision_mode": "force_fp32"}}, "set precision_mode as om.precision_mode"),
])
def test_bad_om_sections_are_named(om, message):
    with pytest.raises(ModelSpecError, match=re.escape(message)):
        spec = make_spec("bad", {"net": {"inputs": {"x": {"shape": [1, "height", "width"]}}, "outputs": {"y": TOLERANCE},
                                         "om": om}})
        OmSettings.of(spec, "net")


def test_output_template_naming_an_unset_dim_is_an_error():
    spec = make_spec("bad", {"net": {"inputs": {"x": {"shape": ["batch"]}}, "outputs": {"y": TOLERANCE},
                                     "om": {"output": "net_{frames}"}}})
    with pytest.raises(ModelSpecError, match="frames"):
        atc_command(spec, "net", {"batch": 1}, model=Path("m.onnx"), output_dir=Path("o"), soc_version="Ascend310P3")


# -- npu-smi ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["npu_smi_guide.txt", "npu_smi_with_banner_and_processes.txt"])
def test_npu_smi_guide_sample(fixture):
    chips = parse_npu_smi_info((OM_FIXTURES / fixture).read_text())
    assert [(c.npu, c.chip, c.device, c.name, c.health, c.bus_id) for c in chips] == [
        (0, 0, 0, "310P3", "OK", "0000:82:00.0"),
        (1, 0, 1, "310P3", "OK", "0000:89:00.0"),
    ]
    assert chips[0].soc_version == "Ascend310P3"


def test_npu_smi_row_without_device_column_uses_the_npu_id():
    text = "\n".join([
        "+---------------------------+---------------+----------------------------------------------------+",
        "| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|",
        "| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |",
        "+===========================+===============+====================================================+",
        "| 3     910B3               | OK            | 93.4        36                0    / 0             |",
        "| 0                         | 0000:C1:00.0  | 0           0    / 0          3378 / 65536         |",
        "+===========================+===============+====================================================+",
    ])
    (chip,) = parse_npu_smi_info(text)
    assert (chip.npu, chip.chip, chip.device, chip.name) == (3, 0, 3, "910B3")


@pytest.mark.parametrize(("text", "message"), [
    ("", r"(?s)no device table .*\(nothing\)"),
    ("dcmi module initialize failed. ret is -8005\n", "dcmi module initialize failed"),
    ("\n".join(GUIDE_NPU_SMI.splitlines()[:4]), "lists no NPU"),
    (GUIDE_NPU_SMI.replace("| 0       310P3     |", "| 0                 |", 1), "cannot read the NPU id, name"),
    (GUIDE_NPU_SMI.replace("| 0       0         | 0000:82:00.0", "+=================+", 1), "two rows per chip"),
])
def test_npu_smi_malformed_output_is_a_clear_error(text, message):
    with pytest.raises(NpuSmiError, match=message):
        parse_npu_smi_info(text)


# -- a host with the fake toolkit -------------------------------------------------------------------
def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def fake_ais_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("ais_bench.infer.interface", OM_FIXTURES / "fake_ais_bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ais_bench", types.ModuleType("ais_bench"))
    monkeypatch.setitem(sys.modules, "ais_bench.infer", types.ModuleType("ais_bench.infer"))
    monkeypatch.setitem(sys.modules, "ais_bench.infer.interface", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toolkit_bin(tmp_path, monkeypatch) -> Path:
    """A PATH holding only the fake npu-smi (guide sample) and the fake atc."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cat = shutil.which("cat")  # resolved before PATH shrinks to the fakes
    _script(bin_dir / "npu-smi", f"exec {cat} {shlex.quote(str(OM_FIXTURES / 'npu_smi_guide.txt'))}")
    _script(bin_dir / "atc", f'exec {shlex.quote(sys.executable)} {shlex.quote(str(OM_FIXTURES / "fake_atc.py"))} "$@"')
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


@pytest.fixture
def npu_host(toolkit_bin, fake_ais_bench):
    return fake_ais_bench


def tiny_onnx(path: Path, dynamic: bool = False) -> Path:
    """image [1,3,H,W] -> heatmap = relu(image) * 2, offset = image - 1 (two outputs, in that order)."""
    shape = [1, 3, "height" if dynamic else 4, "width" if dynamic else 6]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["r"]), helper.make_node("Mul", ["r", "two"], ["heatmap"]),
         helper.make_node("Sub", ["image", "one"], ["offset"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 reads up to IR 13; make_model writes newer
    onnx.save(model, str(path))
    return path


def tiny_request(tmp_path: Path, om: dict, dynamic: bool = False, dims: dict | None = None) -> CompileRequest:
    spec = make_spec("tiny", {"tiny": {
        "inputs": {"image": {"shape": ["batch", 3, "height", "width"]}},
        "outputs": {"heatmap": TOLERANCE, "offset": TOLERANCE},
        "om": om,
    }})
    dims = dims or {"height": 4, "width": 6, "batch": 1}
    image = np.random.default_rng(0).standard_normal((1, 3, dims["height"], dims["width"]))
    feeds = {"image": image.astype(np.float32)}
    return CompileRequest(
        spec=spec, case=Case("tiny", "tiny", "unit", 1, "torchscript", "default", False), dims=dims,
        onnx_path=tiny_onnx(tmp_path / "tiny.onnx", dynamic), build_network=lambda: None, example_feeds=feeds,
        expected_output_shapes=lambda: {"heatmap": feeds["image"].shape, "offset": feeds["image"].shape},
    )


def build(backend: OmBackend, request: CompileRequest, cache: ArtifactCache) -> Path:
    """The artifact as the workspace keys it: dims, tool versions and the om: settings."""
    fields = {"dims": backend.artifact_dims(request), **backend.versions(),
              "settings": backend.artifact_settings(request)}
    key = ArtifactKey("om", "tiny", "tiny", "tiny", fields)
    return cache.get(key, lambda staging: backend.compile(request, staging))


def reference(request: CompileRequest, feeds) -> dict:
    session = onnxruntime.InferenceSession(str(request.onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip(["heatmap", "offset"], session.run(None, dict(feeds))))


# -- availability -----------------------------------------------------------------------------------
def test_availability_names_every_missing_piece(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "ais_bench", None)
    availability = OmBackend().availability()
    assert not availability.ok
    assert "atc not on PATH" in availability.reason
    assert "ais_bench package cannot be imported" in availability.reason
    assert "npu-smi not on PATH" in availability.reason


def test_availability_with_atc_missing_names_atc(toolkit_bin, fake_ais_bench):
    (toolkit_bin / "atc").unlink()
    availability = OmBackend().availability()
    assert not availability.ok
    assert availability.reason.startswith("atc not on PATH")


def test_fake_toolkit_host_is_available_and_classed_by_its_chip(npu_host):
    backend = OmBackend(BackendConfig(device="1"))
    assert backend.availability().ok
    assert backend.device_class() == "310P3"
    assert backend.versions()["soc_version"] == "Ascend310P3"


def test_unlisted_device_is_unavailable(npu_host):
    availability = OmBackend(BackendConfig(device="5")).availability()
    assert not availability.ok
    assert "no NPU device 5" in availability.reason


# -- compile and run --------------------------------------------------------------------------------
def test_compile_writes_config_files_and_runs_through_the_session(npu_host, tmp_path):
    request = tiny_request(tmp_path, {
        "output": "tiny_bs{batch}",
        "precision_mode": "must_keep_origin_dtype",  # fp32 throughout: the OM equals the ONNX
        "files": {"keep_dtype": {"name": "keep.cfg", "content": "OpType::InstanceNorm\n"}},
    })
    backend = OmBackend()
    artifact = build(backend, request, ArtifactCache(tmp_path / "cache"))
    assert (artifact / "keep.cfg").read_text() == "OpType::InstanceNorm\n"
    assert (artifact / "tiny_bs1.om").is_file()
    recorded = shlex.split((artifact / ATC_RECORD).read_text())
    assert "--input_shape=image:1,3,4,6" in recorded
    assert [t for t in recorded if t.startswith("--keep_dtype=")][0].endswith("/keep.cfg")

    session = backend.load(artifact, request)
    outputs = session.run(request.example_feeds)
    assert_outputs_match(outputs, reference(request, request.example_feeds),
                         request.spec.networks["tiny"].outputs, "fake OM vs ONNX")
    assert session.session.modes == ["static"]


def test_atc_failure_carries_its_log(npu_host, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_EXIT", "1")
    monkeypatch.setenv(
        "FAKE_ATC_LOG", "ATC run failed\nE10001: Value [image:1,3,4] for parameter [--input_shape] is invalid"
    )
    request = tiny_request(tmp_path, {"output": "tiny"})
    with pytest.raises(BackendError) as error:
        build(OmBackend(), request, ArtifactCache(tmp_path / "cache"))
    message = str(error.value)
    assert "ATC exited with 1 for tiny-unit-b1-torchscript" in message
    assert "E10001: Value [image:1,3,4] for parameter [--input_shape] is invalid" in message
    assert "--soc_version=Ascend310P3" in message  # the command that failed
    assert not list((tmp_path / "cache").rglob("*.om"))


def test_dynamic_dims_session_picks_the_bucket_and_rejects_other_shapes(npu_host, tmp_path):
    om = {"output": "tiny", "input_format": "ND", "precision_mode": "must_keep_origin_dtype",
          "dynamic_dims": {"dims": ["height", "width"], "buckets": [[4, 6], [6, 4]]}}
    request = tiny_request(tmp_path, om, dynamic=True)
    backend = OmBackend()
    assert backend.artifact_dims(request) == {"batch": 1}  # one OM for every bucket
    artifact = build(backend, request, ArtifactCache(tmp_path / "cache"))
    recorded = shlex.split((artifact / ATC_RECORD).read_text())
    assert {"--input_format=ND", "--input_shape=image:1,3,-1,-1", "--dynamic_dims=4,6;6,4"} <= set(recorded)

    session = backend.load(artifact, request)
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 4, 6), (1, 3, 6, 4)]:
        feeds = {"image": rng.standard_normal(shape).astype(np.float32)}
        assert_outputs_match(session.run(feeds), reference(request, feeds),
                             request.spec.networks["tiny"].outputs, f"fake OM at {shape}")
    assert session.session.modes == ["dymdims", "dymdims"]
    assert session.session.dynamic_dims_calls == ["image:1,3,4,6", "image:1,3,6,4"]
    with pytest.raises(BackendError, match=r"match no --dynamic_dims bucket \(4,6; 6,4\)"):
        session.run({"image": np.zeros((1, 3, 5, 5), np.float32)})
    # ACL itself (the fake, like the real runtime) takes only the gears the OM was built with.
    with pytest.raises(RuntimeError, match="no gear of the model"):
        session.session.infer([np.zeros((1, 3, 5, 5), np.float32)], mode="dymdims")


def test_wrongly_shaped_om_output_is_refused(npu_host, tmp_path):
    request = tiny_request(tmp_path, {"output": "tiny"})
    request.expected_output_shapes = lambda: {"heatmap": (1, 3, 4, 7), "offset": (1, 3, 4, 6)}
    backend = OmBackend()
    session = backend.load(build(backend, request, ArtifactCache(tmp_path / "cache")), request)
    with pytest.raises(BackendError, match="heatmap with shape"):
        session.run(request.example_feeds)


@pytest.mark.parametrize("generation", ["ait", "tools"])
def test_throughput_divides_by_npu_compute_time(npu_host, tmp_path, monkeypatch, generation):
    """The guide's figure: items per call x 1000 / mean NPU compute time in ms, not host time, from
    either ais_bench generation: ait's (start_ms, end_ms) pairs or the Ascend/tools durations."""
    monkeypatch.setattr(npu_host, "InferSession", npu_host.GENERATIONS[generation])
    request = tiny_request(tmp_path, {"output": "tiny"})
    backend = OmBackend()
    session = backend.load(build(backend, request, ArtifactCache(tmp_path / "cache")), request)
    entries = (session.session.summary if generation == "ait" else session.session.sumary)
    session.session.exec_time_ms = 50.0
    session.run(request.example_feeds)  # warm-up, outside the timed rounds
    for ms in (4.0, 3.0, 5.0):
        session.session.exec_time_ms = ms
        session.run(request.example_feeds)
    assert isinstance(entries().exec_time_list[0], tuple if generation == "ait" else float)
    assert session.device_times_ms() == [50.0, 4.0, 3.0, 5.0]
    mean_s, best_s = call_seconds(session, rounds=3, host_mean_s=1.0, host_min_s=0.5)
    assert 2 * 6115 / mean_s == pytest.approx(2 * 6115 / 4.0 * 1000)
    assert best_s == pytest.approx(0.003)  # the device's fastest call, not a host-scaled mean


@pytest.mark.parametrize(("entry", "ms"), [(2.5, 2.5), ((1000.0, 1002.5), 2.5), ([10, 13], 3.0)])
def test_exec_time_entries_of_both_generations_are_durations(entry, ms):
    assert call_duration_ms(entry) == pytest.approx(ms)


@pytest.mark.parametrize("entry", [(5.0, 3.0), "fast", (1.0, 2.0, 3.0)])
def test_unreadable_exec_time_entries_are_named(entry):
    with pytest.raises(BackendError, match="exec_time_list entry"):
        call_duration_ms(entry)


def test_host_timed_sessions_keep_host_mean_and_best():
    assert call_seconds(object(), rounds=3, host_mean_s=0.2, host_min_s=0.1) == (0.2, 0.1)


def test_videopose3d_om_through_the_workspace(npu_host, tmp_path):
    """The whole path with the fake toolkit: yaml -> ATC command -> cache -> ais_bench -> parity,
    at the guide's precision (ATC's default force_fp16): the yaml's om@force_fp16 tolerances hold
    for the raw and decoded outputs, the fp32 ones would not (what the deployed and decoded gates
    check for such an OM; TransPose's case below)."""
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options(weights="seeded"))
    assert zoo.availability("om").ok
    handle = zoo.model("videopose3d")
    case = next(c for c in planning.cases(handle.spec)
                if (c.profile, c.batch, c.exporter) == ("smoke_min", 1, "torchscript"))
    assert_fp16_om_within_the_om_tolerances(handle, case)
    (record,) = (tmp_path / "cache" / "om").rglob(ATC_RECORD)
    recorded = shlex.split(record.read_text())
    assert "--input_shape=2d_poses:1,243,17,2" in recorded
    assert "--precision_mode=force_fp16" in recorded
    assert [t for t in recorded if t.startswith("--output=")][0].endswith("/vp3d_seq243")


# -- ONNX rewrites ----------------------------------------------------------------------------------
def index_arithmetic_onnx() -> onnx.ModelProto:
    """x -> floor -> int64 -> (+1, *2, clip) -> gather from a table; plus a Reshape fed by the index."""
    nodes = [
        helper.make_node("Floor", ["x"], ["f"]),
        helper.make_node("Cast", ["f"], ["i"], to=TensorProto.INT64),
        helper.make_node("Add", ["i", "one"], ["i1"]),
        helper.make_node("Mul", ["i1", "two"], ["i2"]),
        helper.make_node("Less", ["i2", "limit"], ["inside"]),
        helper.make_node("Where", ["inside", "i2", "zero"], ["idx"]),
        helper.make_node("Gather", ["table", "idx"], ["picked"], axis=0),
        helper.make_node("Reshape", ["idx", "flat"], ["idx_flat"]),
        helper.make_node("Cast", ["idx_flat"], ["idx_out"], to=TensorProto.FLOAT),
    ]
    inits = [
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(9, np.int64), "limit"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "table"),
    ]
    graph = helper.make_graph(
        nodes, "index", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("idx_out", TensorProto.FLOAT, [6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_int64_to_int32_keeps_the_results_and_drops_int64_arithmetic():
    original = index_arithmetic_onnx()
    rewritten = int64_to_int32(index_arithmetic_onnx())
    x = np.array([[0.2, 1.7, 2.5], [3.1, 4.9, 0.0]], np.float32)
    for before, after in zip(_run(original, x), _run(rewritten, x)):
        np.testing.assert_array_equal(before, after)
    types_of = {v.name: v.type.tensor_type.elem_type for v in rewritten.graph.value_info}
    assert {types_of[n] for n in ("i", "i1", "i2", "idx")} == {TensorProto.INT32}
    # Reshape wants an int64 shape and gets its data back as int64 through one added cast.
    casts_to_int64 = [n for n in rewritten.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.INT64]
    assert [n.output[0] for n in casts_to_int64] == ["idx__as_int64"]


def _stamp(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
    model.doc_string = ",".join(filter(None, [model.doc_string, name]))
    return model


def test_rewrites_run_in_order_and_unknown_names_fail(tmp_path, monkeypatch):
    source = tmp_path / "in.onnx"
    onnx.save(index_arithmetic_onnx(), str(source))
    assert apply_onnx_rewrites(source, (), tmp_path / "out.onnx") == source  # nothing to rewrite: no copy
    with pytest.raises(BackendError, match=r"unknown ONNX rewrites \['auto_optimizer'\]"):
        apply_onnx_rewrites(source, ("auto_optimizer",), tmp_path / "out.onnx")
    for name in ("first", "second"):
        monkeypatch.setitem(ONNX_REWRITES, name, functools.partial(_stamp, name))
    out = apply_onnx_rewrites(source, ("second", "first"), tmp_path / "out.onnx")
    assert onnx.load(str(out)).doc_string == "second,first"


def test_onnxsim_rewrite_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    with pytest.raises(BackendError, match="pip install onnxsim"):
        ONNX_REWRITES["onnxsim"](index_arithmetic_onnx())


# -- ATC's rules, as the fake toolkit enforces them -------------------------------------------------
def test_gears_follow_the_order_of_the_minus_ones_not_the_yaml(npu_host, tmp_path):
    """ATC reads each --dynamic_dims gear in the order of the -1s in --input_shape (H then W here),
    whatever order the yaml lists the dims in; the OM then serves exactly those shapes."""
    om = {"output": "tiny", "input_format": "ND", "precision_mode": "must_keep_origin_dtype",
          "dynamic_dims": {"dims": ["width", "height"], "buckets": [[6, 4], [8, 4]]}}
    request = tiny_request(tmp_path, om, dynamic=True)
    argv = atc_command(request.spec, "tiny", {"batch": 1}, model=Path("m.onnx"), output_dir=Path("o"),
                       soc_version="Ascend310P3")
    assert "--input_shape=image:1,3,-1,-1" in argv
    assert "--dynamic_dims=4,6;4,8" in argv
    backend = OmBackend()
    session = backend.load(build(backend, request, ArtifactCache(tmp_path / "cache")), request)
    for shape in [(1, 3, 4, 6), (1, 3, 4, 8)]:
        feeds = {"image": np.ones(shape, np.float32)}
        assert_outputs_match(session.run(feeds), reference(request, feeds), request.spec.networks["tiny"].outputs,
                             f"OM at {shape}")


def fake_atc(tmp_path: Path, model: Path, *flags: str):
    import subprocess

    argv = [sys.executable, str(OM_FIXTURES / "fake_atc.py"), "--framework=5", f"--model={model}",
            f"--output={tmp_path / 'out'}", "--soc_version=Ascend310P3", *flags]
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.mark.parametrize(("flags", "message"), [
    (["--input_shape=image:1,3,-1,-1", "--dynamic_dims=4,6"], "E10035"),  # one gear: ATC needs 2..100
    (["--input_shape=image:1,3,-1,-1", "--dynamic_dims=4;6"], "E10042"),  # one value per -1
    (["--input_shape=image:1,3,-1,-1"], "has -1 but no --dynamic_dims"),
    (["--input_shape=image:1,3,4,6", "--precision_mode=fp16"], "--precision_mode"),
])
def test_fake_atc_refuses_what_atc_refuses(tmp_path, flags, message):
    done = fake_atc(tmp_path, tiny_onnx(tmp_path / "tiny.onnx", dynamic=True), *flags)
    assert done.returncode == 1 and message in done.stdout, done.stdout


def custom_domain_onnx(path: Path) -> Path:
    """image -> Relu -> DeformableConv2D in the exporter's custom ``ascend`` domain, as DEKR exports it."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["r"]),
         helper.make_node("DeformableConv2D", ["r", "w", "off"], ["heatmap"], domain="ascend", name="dcn"),
         helper.make_node("Sub", ["image", "one"], ["offset"])],
        "custom", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 6])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, 3, 4, 6]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1, 3, 4, 6])],
        [numpy_helper.from_array(np.ones((3, 3, 3, 3), np.float32), "w"),
         numpy_helper.from_array(np.zeros((1, 27, 4, 6), np.float32), "off"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("ascend", 1)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("rewrites", [[], ["custom_ops_to_default_domain"]])
def test_custom_ops_reach_atc_in_the_default_domain(npu_host, tmp_path, rewrites):
    """ATC's parser refuses default-domain nodes in a model importing two domains (E16005) and
    knows DeformableConv2D under ai.onnx only: the rewrite at the OM boundary is what makes it build."""
    request = tiny_request(tmp_path, {"output": "dcn", "onnx_rewrites": rewrites})
    request.onnx_path = custom_domain_onnx(tmp_path / "custom.onnx")
    staging = tmp_path / "staging"
    staging.mkdir()
    if not rewrites:
        with pytest.raises(BackendError, match="E16005"):
            OmBackend().compile(request, staging)
        return
    OmBackend().compile(request, staging)
    built = onnx.load(str(staging / "dcn.om"))
    assert {o.domain for o in built.opset_import} == {""}
    assert [n.domain for n in built.graph.node if n.op_type == "DeformableConv2D"] == [""]
    onnx.checker.check_model(onnx.load(str(request.onnx_path)))  # the exported file itself stays valid


def test_fake_atc_knows_deformable_conv2d_only_at_opsets_9_to_16(tmp_path):
    model = custom_domain_onnx(tmp_path / "custom.onnx")
    proto = ONNX_REWRITES["custom_ops_to_default_domain"](onnx.load(str(model)))
    proto.opset_import[0].version = 17
    onnx.save(proto, str(tmp_path / "v17.onnx"))
    done = fake_atc(tmp_path, tmp_path / "v17.onnx", "--input_shape=image:1,3,4,6")
    assert done.returncode == 1 and "optype [DeformableConv2D]] in domain [ai.onnx] version [17]" in done.stdout


@pytest.mark.slow
def test_dekr_onnx_reaches_atc_with_deformable_conv_in_the_default_domain(npu_host, tmp_path):
    """DEKR's exported Ascend graph, through the yaml's om: section, into (the fake) ATC.

    Nightly: exporting HRNet's Ascend variant costs ~12 s, and the nightly's DEKR OM gates build
    it through the real ATC. The CPU tier keeps each part: the rewrite
    (test_custom_ops_reach_atc_in_the_default_domain), the fake ATC's DeformableConv2D opsets, the
    gears' order, and DEKR's OM rows at its five buckets (test_dekr_om_is_parametrized_...)."""
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options(weights="seeded"))
    handle = zoo.model("dekr")
    case = next(c for c in planning.cases(handle.spec) if c.variant == "ascend_deformable_conv2d")
    backend = zoo.backend("om")
    request = handle.compile_request(case)
    request.onnx_path = handle.onnx(case, dynamic_dims=backend.dynamic_input_dims(request))
    exported = onnx.load(str(request.onnx_path), load_external_data=False)
    assert {n.domain for n in exported.graph.node if n.op_type == "DeformableConv2D"} == {"ascend"}
    staging = tmp_path / "staging"
    staging.mkdir()
    backend.compile(request, staging)
    built = onnx.load(str(staging / "dekr_bs1.om"), load_external_data=False)
    assert {o.domain for o in built.opset_import} == {""}
    assert {n.domain for n in built.graph.node if n.op_type == "DeformableConv2D"} == {""}
    recorded = shlex.split((staging / ATC_RECORD).read_text())
    assert "--dynamic_dims=512,768;512,512;768,512;512,1024;1024,512" in recorded


def test_dekr_om_is_parametrized_at_its_atc_buckets_only():
    """The OM serves its five --dynamic_dims gears; the 128 x 128 smoke shape would fail every night."""
    spec = load_model_spec("dekr")
    om_profiles = sorted(c.profile for c in planning.cases(spec) if planning.case_runs_on(spec, c, "om"))
    assert om_profiles == sorted(["bucket_512x768", "bucket_512x512", "bucket_768x512", "bucket_512x1024",
                                  "bucket_1024x512"])
    smoke = next(c for c in planning.cases(spec) if c.profile == "smoke" and c.variant == "grid_sample")
    assert planning.case_runs_on(spec, smoke, "onnxruntime")
    # The accuracy pass picks each image's bucket itself, so the OM still serves it.
    ascend = next(c for c in planning.cases(spec) if c.profile == "smoke" and c.variant == "ascend_deformable_conv2d")
    assert not planning.case_runs_on(spec, ascend, "om") and planning.case_runs_on(spec, ascend, "om", at_profile_shape=False)


# -- precision mode ---------------------------------------------------------------------------------
def test_precision_mode_changes_the_command_the_artifact_and_the_numbers(npu_host, tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    backend = OmBackend()
    fp16 = tiny_request(tmp_path, {"output": "tiny"})
    fp32 = tiny_request(tmp_path, {"output": "tiny", "precision_mode": "must_keep_origin_dtype"})
    built16, built32 = build(backend, fp16, cache), build(backend, fp32, cache)
    assert built16 != built32  # a different precision mode is a different OM
    assert "--precision_mode=force_fp16" in shlex.split((built16 / ATC_RECORD).read_text())
    assert "--precision_mode=must_keep_origin_dtype" in shlex.split((built32 / ATC_RECORD).read_text())
    assert OmBackend.tolerance_key(fp16.spec, "tiny") == "om@force_fp16"
    assert OmBackend.tolerance_key(fp32.spec, "tiny") == "om@must_keep_origin_dtype"

    feeds = fp16.example_feeds
    expected = reference(fp16, feeds)
    out16 = backend.load(built16, fp16).run(feeds)
    out32 = backend.load(built32, fp32).run(feeds)
    assert_outputs_match(out32, expected, fp32.spec.networks["tiny"].outputs, "fp32 OM vs ONNX")
    for name, value in out16.items():
        np.testing.assert_array_equal(value, value.astype(np.float16).astype(np.float32))  # fp16 storage
        assert not np.array_equal(value, expected[name])
        np.testing.assert_allclose(value, expected[name], rtol=2 ** -9, atol=1e-3)


@pytest.mark.parametrize(("model", "profile", "batch"), [
    # VideoPose3D smoke_min b1: test_videopose3d_om_through_the_workspace. The batched OM's
    # --input_shape is held against the guide by test_atc_command_matches_guide; its numbers (an
    # export and an OM of ~6 s) are the nightly's, like the real OM gates at every batch size.
    ("transpose", "smoke", 1), pytest.param("transpose", "smoke_batched", 4, marks=pytest.mark.slow),
])
def test_fp16_om_agrees_within_the_yaml_om_tolerances_not_the_fp32_ones(npu_host, tmp_path, model, profile, batch):
    """What the deployed and decoded gates check for an OM built at the guide's precision (ATC's
    default force_fp16): the yaml's om@force_fp16 tolerances hold, the fp32 ones would not."""
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options(weights="seeded"))
    handle = zoo.model(model)
    case = next(c for c in planning.cases(handle.spec)
                if (c.profile, c.batch, c.exporter) == (profile, batch, "torchscript"))
    assert_fp16_om_within_the_om_tolerances(handle, case)


def assert_fp16_om_within_the_om_tolerances(handle, case) -> None:
    spec = handle.spec
    net = spec.networks[case.network]
    key = OmBackend.tolerance_key(spec, case.network)
    assert key == "om@force_fp16"
    feeds = handle.feeds(case)
    actual = handle.session("om", case).run(feeds)
    expected = handle.session("onnx", case).run(feeds)
    assert_outputs_match(actual, expected, {o: spec.tolerance(case.network, o, key) for o in net.outputs}, "raw")
    decoded_om = handle.slice.decode(case.network, feeds, actual)
    decoded_torch = handle.slice.decode(case.network, feeds, handle.reference(case))
    om_tolerances = {n: spec.decoded_tolerance(case.network, n, key) for n in net.decoded}
    assert_outputs_match(decoded_om, decoded_torch, om_tolerances, f"{case.id}: decoded om vs torch")
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_outputs_match(decoded_om, decoded_torch, net.decoded, "decoded at fp32 tolerances")


# -- python -m tooling doctor -----------------------------------------------------------------------
@pytest.mark.parametrize(("generation", "reported"), [("ait", "ait benchmark (summary()"), ("tools", "Ascend/tools (sumary()")])
def test_doctor_passes_a_complete_host_and_names_the_ais_bench_generation(
        toolkit_bin, fake_ais_bench, monkeypatch, capsys, generation, reported):
    from tooling.cli import main

    (toolkit_bin.parent / "version.info").write_text("Version=6.0.RC1\n")  # as CANN ships it beside bin/
    monkeypatch.setattr(fake_ais_bench, "InferSession", fake_ais_bench.GENERATIONS[generation])
    monkeypatch.setitem(sys.modules, "aclruntime", types.ModuleType("aclruntime"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "(CANN 6.0.RC1)" in out
    assert reported in out
    assert "2 chip(s), soc Ascend310P3: device 0: NPU 0 chip 0 310P3 OK 0000:82:00.0; device 1:" in out
    assert "onnxsim" in out and "ready for the OM gates" in out


def test_doctor_names_every_missing_piece(tmp_path, monkeypatch, capsys):
    from tooling import doctor

    monkeypatch.setenv("PATH", str(tmp_path))
    for module in ("ais_bench", "aclruntime"):
        monkeypatch.setitem(sys.modules, module, None)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project.optional-dependencies]\nnpu = ["onnxsim==0.8.1", "not-a-zoo-package==1.0"]\n')
    monkeypatch.setattr(doctor, "npu_extra", functools.partial(doctor.npu_extra, pyproject))
    assert doctor.doctor() == 1
    out = capsys.readouterr().out
    for expected in ("MISSING atc          not on PATH (source /usr/local/Ascend/ascend-toolkit/set_env.sh)",
                     "MISSING ais_bench", "MISSING aclruntime", "MISSING npu-smi      npu-smi not on PATH",
                     "MISSING not-a-zoo-package not installed",
                     "not ready: atc, ais_bench, aclruntime, npu-smi, not-a-zoo-package"):
        assert expected in out


def test_doctor_refuses_an_ais_bench_without_per_call_times(fake_ais_bench, monkeypatch):
    from tooling.doctor import check_ais_bench

    monkeypatch.setattr(fake_ais_bench, "InferSession", type("InferSession", (), {}))
    check = check_ais_bench()
    assert not check.ok and "neither summary() nor sumary()" in check.detail


def test_doctor_reports_unhealthy_chips(toolkit_bin):
    from tooling.doctor import check_npus

    sick = toolkit_bin.parent / "npu_smi_sick.txt"
    sick.write_text(GUIDE_NPU_SMI.replace("| 1       310P3     | OK    ", "| 1       310P3     | Alarm ", 1))
    _script(toolkit_bin / "npu-smi", f"exec {shutil.which('cat', path='/bin:/usr/bin')} {shlex.quote(str(sick))}")
    check = check_npus()
    assert not check.ok and "devices [1] are not healthy" in check.detail


@pytest.mark.videopose3d
def test_om_triage_names_the_node_the_om_miscomputes(npu_host, tmp_path, monkeypatch):
    """The first-divergence triage on the OM: the exposed graph goes through ATC like the case's own,
    ais_bench returns its many outputs by position and they are named after that graph's outputs
    (not the network's one), here a run at a time under a small memory budget; a Conv whose weight
    the OM holds 1.5x too large is the node named, and no earlier node diverges (fp16 rounding
    stays within the om@force_fp16 tolerances)."""
    from tests.engine.test_triage import scaled_initializer
    from tooling.triage import triage_case

    monkeypatch.setenv("ZOO_TRIAGE_MEMORY_MB", "0.25")
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options(weights="seeded"))
    handle = zoo.model("videopose3d")
    case = next(c for c in planning.cases(handle.spec)
                if (c.profile, c.batch, c.exporter) == ("smoke_min", 1, "torchscript"))
    model = onnx.load(str(handle.onnx(case)))
    target = [n for n in model.graph.node if n.op_type == "Conv"][3]
    report = triage_case(handle, case, "om", perturb=scaled_initializer(target.input[1], 1.5))
    assert report.first is not None, report.summary()
    assert report.first.output.node == target.name and not report.not_exposed
    assert report.runs > 1 and "om vs ONNX Runtime" in report.what
