"""The AOTInductor backend: compile through the artifact cache, load, agree with eager; errors.

The one real compile here (a small conv network, ~10-25 s on two cores) lands in the project's
artifact cache (ZOO_CACHE_DIR or .zoo-cache/), so later runs only load it. It is in the nightly
tier: the CPU tier compiles real networks the same way (tests/models, the ``aoti`` rows of
deployed-vs-onnx: Conv + BatchNorm folded by freezing, built once through the cache, then loaded
again by the decoded-vs-torch rows), so a fresh clone pays for AOTInductor once per network there.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from tooling import planning
from tooling.backends import BACKENDS
from tooling.backends.base import Availability, Backend, BackendError, CompileRequest
from tooling.backends import aoti
from tooling.backends.aoti import PACKAGE, AotiBackend, AotiCudaBackend, AotiSession
from tooling.baseline import parse_model_spec
from tooling.cache import ArtifactCache, ArtifactKey
from tooling.locations import Roots
from tooling.model_spec import Case
from tooling.workspace import Options, Workspace

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


class ConvBlock(torch.nn.Module):
    """Conv + BatchNorm + ReLU, two outputs: what freezing folds, and output naming by position."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(8)
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)

    def forward(self, image):
        features = torch.relu(self.norm(self.conv(image)))
        return features, features.mean(dim=(2, 3))


class DataDependentBranch(torch.nn.Module):
    def forward(self, image):
        return image * 2 if image.sum() > 0 else image


def request_for(network: torch.nn.Module) -> CompileRequest:
    spec = parse_model_spec({
        "model": "tiny",
        "slice": "tooling.models.videopose3d",
        "networks": {"tiny": {
            "inputs": {"image": {"shape": ["batch", 3, 8, 8]}},
            "outputs": {"features": TOLERANCE, "pooled": TOLERANCE},
            "opset": {"torchscript": 17},
        }},
        "profiles": {"unit": {"batch_sizes": [2]}},
        "throughput": {},
    }, "inline tiny")
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    return CompileRequest(
        spec=spec, case=Case("tiny", "tiny", "unit", 2, "torchscript", "default", False), dims={"batch": 2},
        onnx_path=None, build_network=lambda: network.eval(), example_feeds=feeds,
    )


@pytest.mark.slow
def test_package_matches_eager_and_is_built_once(tmp_path):
    network = ConvBlock().eval()
    request = request_for(network)
    backend = AotiBackend()
    assert backend.availability().ok, backend.availability().reason
    cache = ArtifactCache(Roots.resolve().cache_dir)
    # Keyed on what the package is built from, so editing this test's network rebuilds it.
    fields = {"source": inspect.getsource(ConvBlock), "versions": backend.versions()}
    key = ArtifactKey("aoti", "engine-tests", "tiny", "convblock-2", fields)
    first = cache.get(key, lambda staging: backend.compile(request, staging))
    again = cache.get(key, lambda staging: pytest.fail("a cached package was rebuilt"))
    assert first == again and (first / PACKAGE).is_file()

    outputs = backend.load(first, request).run(request.example_feeds)
    with torch.inference_mode():
        features, pooled = network(torch.from_numpy(request.example_feeds["image"]))
    np.testing.assert_allclose(outputs["features"], features.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs["pooled"], pooled.numpy(), atol=1e-5, rtol=1e-5)

    # A process whose session outlives interpreter shutdown (held here by a daemon thread, as by
    # a cache nobody clears) still leaves no extracted copy of the package in its TMPDIR.
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    script = (
        "import threading, time\n"
        "from tooling.backends.aoti import AotiSession\n"
        "import torch\n"
        f"session = AotiSession(torch._inductor.aoti_load_package({str(first / PACKAGE)!r}), ['image'], ['f', 'p'])\n"
        "threading.Thread(target=lambda held=session: time.sleep(600), daemon=True).start()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                   env={**os.environ, "TMPDIR": str(scratch)})
    assert not list(scratch.glob("aotinductor_*")), "the package's extracted copy was left in TMPDIR"


class FakeRunner:
    """Stands in for a package loader: what matters is when the session lets it go."""

    def __call__(self, *inputs):
        return inputs


def test_open_sessions_let_their_loaders_go_at_exit():
    session = AotiSession(FakeRunner(), ["image"], ["image"])
    loader = weakref.ref(session.network)
    aoti._close_open_runners()  # what atexit runs before the interpreter tears down its caches
    assert loader() is None, "a session still holds its package loader after exit cleanup"


def test_export_failure_is_a_backend_error_naming_the_case(tmp_path):
    with pytest.raises(BackendError, match="torch.export cannot capture tiny-unit-b2-torchscript"):
        AotiBackend().compile(request_for(DataDependentBranch()), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a host without CUDA")
def test_cuda_variant_says_why_it_is_unavailable():
    availability = AotiCudaBackend().availability()
    assert not availability.ok
    assert "CPU-only build" in availability.reason or "no CUDA device" in availability.reason


class RecordingCompiler(Backend):
    """A compiled backend whose 'compile' writes the case it was asked for."""

    name = "recording-compiler"
    consumes = "torch"
    needs_compile = True
    builds: list[str] = []

    def compile(self, request: CompileRequest, staging: Path) -> None:
        self.builds.append(request.case.id)
        (staging / "built-for.txt").write_text(request.case.id)

    def load(self, artifact: Path, request: CompileRequest):
        return artifact


def test_cases_differing_only_in_exporter_share_a_torch_compiled_artifact(tmp_path, monkeypatch):
    """A backend that compiles the torch network never sees the exporter: one build serves both."""
    monkeypatch.setitem(BACKENDS, RecordingCompiler.name, RecordingCompiler)
    monkeypatch.setattr(RecordingCompiler, "builds", [])
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options(weights="seeded"))
    handle = zoo.model("videopose3d")
    smoke = [c for c in planning.cases(handle.spec) if c.profile == "smoke"]
    assert sorted(c.exporter for c in smoke) == ["dynamo", "torchscript"]
    artifacts = {handle.session(RecordingCompiler.name, case) for case in smoke}
    assert len(artifacts) == 1 and len(RecordingCompiler.builds) == 1


class SlowToAsk(Backend):
    """A backend whose availability and versions are slow to ask, and say what they depend on."""

    name = "slow-to-ask"
    asked: list[str] = []
    inputs: dict | None = {"compiler": "g++ 1"}

    def availability(self):
        self.asked.append("availability")
        return Availability(True)

    def versions(self):
        self.asked.append("versions")
        return {"tool": "1.0"}

    def probe_inputs(self):
        return self.inputs


def test_a_slow_probe_is_asked_once_per_inputs_and_kept_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, SlowToAsk.name, SlowToAsk)
    monkeypatch.setattr(SlowToAsk, "asked", [])

    def process():  # a new process: a new workspace over the same cache
        return Workspace(Roots.resolve(cache_dir=tmp_path / "cache"), Options()).probe(SlowToAsk.name)

    assert process() == (Availability(True), {"tool": "1.0"}) and SlowToAsk.asked == ["availability", "versions"]
    assert process() == (Availability(True), {"tool": "1.0"}) and len(SlowToAsk.asked) == 2, "read, not asked"
    monkeypatch.setattr(SlowToAsk, "inputs", {"compiler": "g++ 2"})  # another compiler: asked again
    process()
    assert len(SlowToAsk.asked) == 4
    (tmp_path / "cache" / "probes" / f"{SlowToAsk.name}.json").write_text("{damaged")
    process()
    assert len(SlowToAsk.asked) == 6, "a damaged record is asked again"
    monkeypatch.setattr(SlowToAsk, "inputs", None)  # says nothing about its inputs: asked every process
    process(), process()
    assert len(SlowToAsk.asked) == 10


def test_aoti_probe_inputs_follow_the_compiler_and_the_cpu(monkeypatch):
    backend = AotiBackend()
    before = backend.probe_inputs()
    assert before == backend.probe_inputs()
    monkeypatch.setenv("CXX", "clang++-that-is-not-installed")
    assert backend.probe_inputs()["compiler"][1] is None and backend.probe_inputs() != before
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/set-by-importing-inductor")
    assert backend.probe_inputs() == before, "Inductor's own cache location is no input of the probe"
    monkeypatch.setattr("tooling.backends.aoti._cpuinfo", lambda: "flags\t: fpu sse2\n")
    assert backend.probe_inputs()["cpu_flags"] != before["cpu_flags"]
    assert AotiCudaBackend().probe_inputs() is None
