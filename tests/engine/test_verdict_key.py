"""A cached verdict cannot lie: over every gate instance of the five real models (the rows the
plugin parametrizes, nightly ones included), changing exactly one input changes the keys of the
verdicts that depend on it, and no other. Each test names the input kind it changes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tooling import baseline, fingerprint, model_spec, planning
from tooling.backends import BACKENDS
from tooling.gates import GATES, GateContext
from tooling.locations import Roots
from tooling.baseline import load_model_spec, model_names
from tooling.model_spec import PROJECT_ROOT
from tooling.verdict_key import GateInstance, forget, verdict_key
from tooling.workspace import Options, Workspace

MODELS = ("videopose3d", "transpose", "dekr", "gma", "fomm")


def gate_instances() -> list[GateInstance]:
    """Every row the plugin would parametrize, built from the gate registry as it does."""
    instances = []
    for model in MODELS:
        spec = load_model_spec(model)
        ctx = GateContext(spec=spec, cases=planning.cases(spec), exporters=None, selected_backends=None, accuracy_backend=None)
        test_file = PROJECT_ROOT / "tests" / "models" / f"test_{model}.py"
        for gate in GATES.values():
            if gate.parametrize is None:
                rows = [{}]
            else:
                argnames, params = gate.parametrize(ctx)
                names = [argnames] if isinstance(argnames, str) else list(argnames)
                rows = [dict(zip(names, p.values)) for p in params]
            for i, params in enumerate(rows):
                instances.append(GateInstance(model, gate.label, params, f"{model}::{gate.label}[{i}]", (test_file,)))
    return instances


INSTANCES = gate_instances()


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """``keys()``: node -> key digest of every instance, under the roots and options given; each
    call is a fresh run (digests are memoised per process while files are unchanged)."""
    def compute(**roots) -> dict[str, str]:
        forget()
        workspace = Workspace(Roots(roots.get("data_root"), roots.get("weights_root"), roots.get("upstream_root"),
                                    tmp_path / "cache"), Options())
        return {i.nodeid: verdict_key(i, workspace).digest for i in INSTANCES}

    return compute


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {node for node in before if before[node] != after[node]}


def nodes(predicate) -> set[str]:
    return {i.nodeid for i in INSTANCES if predicate(i)}


def backend_of(instance: GateInstance) -> str | None:
    gate = GATES[instance.gate]
    return instance.params.get(gate.backend_arg) if gate.backend_arg else None


def runs_on(instance: GateInstance) -> set[str]:
    """The backends a row runs besides torch eager: its own and, for the speed-up gate, every
    deployed CPU backend serving its case (its contenders)."""
    backends = {backend_of(instance)} | set(GATES[instance.gate].uses)
    if instance.gate == "cpu-speedup":
        spec = load_model_spec(instance.model)
        backends |= {n for n, cls in BACKENDS.items() if cls.deployed and cls.marker is None
                     and planning.case_runs_on(spec, instance.params["case"], n)}
    return backends - {None}


@pytest.fixture
def engine_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the engine the keys read instead of the checkout's, to edit."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "tooling", root / "tooling", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "ENGINE_ROOT", root / "tooling")
    fingerprint._closure.cache_clear()  # the import graph, read from the copy
    yield root / "tooling"
    monkeypatch.undo()
    fingerprint._closure.cache_clear()
    forget()


def edit(path: Path, text: str = "\n# an edit\n") -> None:
    path.write_text(path.read_text() + text)


def test_the_keys_are_stable_and_distinct(keys):
    first = keys()
    assert first == keys(), "an unchanged input gives the same key"
    assert len(set(first.values())) == len(first), "every gate instance has its own key"


def test_one_slice_code_reruns_that_model_only(keys, engine_copy):
    before = keys()
    edit(engine_copy / "models" / "gma" / "padding.py")
    assert changed(before, keys()) == nodes(lambda i: i.model == "gma")


def test_a_shared_stack_reruns_the_models_that_import_it(keys, engine_copy):
    before = keys()
    edit(engine_copy / "coco" / "topdown.py")  # COCO top-down decoding
    # GMA's Sintel and FOMM's video readers use the COCO stack's image reader: importing it runs
    # the package, so they depend on it too. VideoPose3D does not import it.
    assert changed(before, keys()) == nodes(lambda i: i.model in ("dekr", "transpose", "gma", "fomm"))


def test_an_engine_module_reruns_every_gate(keys, engine_copy):
    before = keys()
    edit(engine_copy / "compare.py")
    assert changed(before, keys()) == set(before)


def test_a_yaml_tolerance_reruns_the_rows_that_read_it(keys, tmp_path, monkeypatch):
    baselines = tmp_path / "baselines"
    shutil.copytree(baseline.BASELINES_DIR, baselines)
    monkeypatch.setattr(baseline, "BASELINES_DIR", baselines)
    before = keys()
    dekr = baselines / "dekr.yaml"
    text = dekr.read_text()
    marker = "  openvino:\n"
    head, tail = text.split(marker, 1)
    dekr.write_text(head + marker + tail.replace("atol_of_max: 2.0e-3", "atol_of_max: 2.5e-3", 1))
    assert dekr.read_text() != text
    uses_openvino = nodes(lambda i: i.model == "dekr" and "openvino" in runs_on(i))
    assert uses_openvino and changed(before, keys()) == uses_openvino


def test_a_golden_reruns_its_golden_row_only(keys, tmp_path, monkeypatch):
    fixtures = tmp_path / "fixtures"
    for path in model_spec.FIXTURES_DIR.rglob("*"):  # the same files, linked; one golden replaced
        target = fixtures / path.relative_to(model_spec.FIXTURES_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            target.symlink_to(path)
    monkeypatch.setattr(model_spec, "FIXTURES_DIR", fixtures)
    golden = sorted((fixtures / "gma" / "golden").iterdir())[0]
    before = keys()
    data = bytearray(golden.read_bytes())
    data[-1] ^= 1
    golden.unlink()
    golden.write_bytes(bytes(data))
    assert changed(before, keys()) == nodes(
        lambda i: i.gate == "golden" and i.model == "gma" and i.params["golden"]["file"] == golden.name)


def test_a_checkpoint_replaced_with_the_same_size_and_mtime(keys, tmp_path):
    weights = tmp_path / "weights"
    (weights / "dekr").mkdir(parents=True)
    checkpoint = weights / "dekr" / "final_rescore_coco_kpt.pth"  # the rescoring net's
    checkpoint.write_bytes(b"A" * 4096)
    stat = checkpoint.stat()
    before = keys(weights_root=weights)
    with checkpoint.open("r+b") as f:  # in place: same inode, size and (restored) mtime
        f.write(b"B")
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint.stat().st_size == stat.st_size and checkpoint.stat().st_mtime_ns == stat.st_mtime_ns
    reads = {"onnx-vs-torch", "deployed-vs-onnx", "decoded-vs-torch", "throughput", "cpu-speedup", "accuracy"}
    expected = nodes(lambda i: i.model == "dekr" and i.gate in reads and (
        i.gate == "accuracy" or getattr(i.params.get("case"), "network", None) == "rescore"))
    assert expected and changed(before, keys(weights_root=weights)) == expected


def test_one_data_file_edited_in_place(keys, tmp_path):
    data = tmp_path / "data"
    (data / "human36m").mkdir(parents=True)
    for name in ("data_3d_h36m.npz", "data_2d_h36m_cpn_ft_h36m_dbb.npz"):
        (data / "human36m" / name).write_bytes(b"\0" * 1024)
    before = keys(data_root=data)
    target = data / "human36m" / "data_2d_h36m_cpn_ft_h36m_dbb.npz"
    stat = target.stat()
    with target.open("r+b") as f:
        f.seek(512)
        f.write(b"\1")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed(before, keys(data_root=data)) == nodes(lambda i: i.model == "videopose3d" and i.gate == "accuracy")


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_a_runtime_version_reruns_the_rows_on_it(keys, monkeypatch, runtime):
    module = pytest.importorskip(runtime)
    before = keys()
    monkeypatch.setattr(module, "__version__", module.__version__ + ".post1")
    # ONNX Runtime serves the ONNX reference and its CUDA and TensorRT providers too.
    backends = {n for n in BACKENDS if n.startswith("onnx")} if runtime == "onnxruntime" else {runtime}
    expected = nodes(lambda i: runs_on(i) & backends)
    assert changed(before, keys()) == expected
    assert nodes(lambda i: i.gate == "golden") - expected, "torch-only rows do not depend on it"


def test_another_cpu_reruns_the_speed_gates_only(keys, monkeypatch):
    from tooling import verdict_key as module

    before = keys()
    monkeypatch.setattr(module, "host_cpu", lambda: {"cpu": "Another CPU @ 2.0GHz", "cores": 2})
    assert changed(before, keys()) == nodes(lambda i: GATES[i.gate].timed)


def test_every_model_is_covered():
    assert set(MODELS) <= set(model_names())
    assert {i.gate for i in INSTANCES} == set(GATES)


def test_a_stored_pass_keeps_its_pictures_and_a_missing_one_is_damage(tmp_path):
    from tooling.verdict_cache import DamagedEntry, VerdictCache
    from tooling.verdict_key import VerdictKey

    picture = tmp_path / "run" / "disagreement-openvino.png"
    picture.parent.mkdir()
    picture.write_bytes(b"\x89PNG picture")
    cache = VerdictCache(tmp_path / "cache")
    key = VerdictKey("k" * 32, {"node": "x"}, timed=False)
    cache.store("toynet", key, nodeid="x", results=[{"worst_max_abs": 0.0, "pictures": {"largest": str(picture)}}],
                relabels=[], run="run-1", seconds=1.5)
    picture.unlink()  # the test's tmp dir goes; the kept copy stays
    stored = cache.load("toynet", key)
    kept = Path(stored.results[0]["pictures"]["largest"])
    assert kept.read_bytes() == b"\x89PNG picture" and stored.run == "run-1" and stored.provenance()["commit"]
    kept.unlink()
    with pytest.raises(DamagedEntry, match="picture .* is missing"):
        cache.load("toynet", key)
    cache.path("toynet", key).write_text('{"sha256": "0", "entry": {}}')
    with pytest.raises(DamagedEntry, match="checksum"):
        cache.load("toynet", key)
    assert cache.load("toynet", VerdictKey("n" * 32, {}, timed=False)) is None


def test_one_slice_code_reruns_that_models_slice_tests_only(engine_copy, tmp_path):
    """The slices' own tests (tests/models/<model>/) are keyed by the engine, their model's slice
    and what they import: a GMA edit reruns GMA's and leaves the other models' reused; an engine
    module reruns them all; a test for no model is keyed by every engine file."""
    from tooling.verdict_key import slice_test_key

    tests = sorted((PROJECT_ROOT / "tests" / "models").glob("*/test_*.py"))
    assert {t.parent.name for t in tests} == set(MODELS)

    def keys() -> dict[str, str]:
        forget()
        workspace = Workspace(Roots(None, None, None, tmp_path / "cache"), Options())
        return {f"{t.parent.name}/{t.name}": slice_test_key(t.name, {}, (t,), workspace, (t.parent.name,)).digest
                for t in tests} | {"unnamed": slice_test_key("u", {}, (tests[0],), workspace).digest}

    before = keys()
    edit(engine_copy / "models" / "gma" / "padding.py")
    after = keys()
    assert changed(before, after) == {k for k in before if k.startswith("gma/")} | {"unnamed"}
    edit(engine_copy / "compare.py")
    assert changed(after, keys()) == set(before)


def test_a_new_session_id_keeps_slice_tests_reusable_a_fixture_root_does_not(tmp_path, monkeypatch):
    """.ci/conformance and tooling/nightly.sh export a new ZOO_SESSION_ID per invocation: it names the
    run and changes no result, so a slice test's key ignores it (before, no slice test was ever
    reused from one invocation to the next); a ZOO_* variable that moves what is read still counts."""
    from tooling.verdict_key import slice_test_key

    workspace = Workspace(Roots(None, None, None, tmp_path / "cache"), Options())
    test = PROJECT_ROOT / "tests" / "models" / "gma" / "test_port.py"

    def key() -> str:
        return slice_test_key("t", {}, (test,), workspace, ("gma",)).digest

    monkeypatch.setenv("ZOO_SESSION_ID", "conformance-1")
    first = key()
    monkeypatch.setenv("ZOO_SESSION_ID", "conformance-2")
    monkeypatch.setenv("ZOO_HOST", "another-name")
    assert key() == first
    monkeypatch.setenv("ZOO_FIXTURES_DIR", str(tmp_path))
    assert key() != first


def test_a_function_parameter_is_keyed_by_name_not_by_its_address(tmp_path):
    """A slice test parametrized with functions (a sampler, a lambda mangling a file) gets the same
    key in every process: a repr's memory address would make it never reusable."""
    from tooling.verdict_key import slice_test_key

    workspace = Workspace(Roots(None, None, None, tmp_path / "cache"), Options())
    test = PROJECT_ROOT / "tests" / "models" / "gma" / "test_port.py"

    def key(function) -> str:
        return slice_test_key("t[x]", {"sample": function}, (test,), workspace, ("gma",)).digest

    first, same = (lambda b: b[:-4]), (lambda b: b[:-4])
    assert key(first) == key(same), "two processes' copies of one lambda"
    assert key(first) != key(edit), "another function"
