"""The throw-away toy model (one slice, one yaml, one short test module) that tests of the
plugin run in a separate pytest process: test_new_model.py, test_verdict_cache.py,
test_accuracy_reference.py, test_history_runs.py."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

from tooling.model_spec import PROJECT_ROOT

TOY_SLICE = '''
import numpy as np
import torch
from tooling.slice import KnownAnswer, ModelSlice


class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Conv2d(1, 1, 1, bias=False)

    def forward(self, x):
        return torch.relu(self.scale(x))


class ToySlice(ModelSlice):
    name = "toynet"

    def build_network(self, network, variant="default"):
        return Doubler().eval()

    def decode(self, network, feeds, outputs):
        return {"peak": outputs["y"].max(axis=(2, 3))}

    def evaluate(self, ctx):
        images = np.load(ctx.data_paths["toy/images.npy"])[: ctx.limit]
        outputs = [ctx.run("doubler", {"x": images[i : i + 1]})["y"] for i in range(len(images))]
        return {"mean_peak": float(np.mean([o.max() for o in outputs]))}

    def make_known_answer(self, root):
        rng = np.random.default_rng(0)
        images = rng.standard_normal((3, 1, 1, 8, 8)).astype(np.float32)
        (root / "data" / "toy").mkdir(parents=True)
        np.save(root / "data" / "toy" / "images.npy", images[:, 0])
        (root / "weights" / "toynet").mkdir(parents=True)
        torch.save({"scale.weight": torch.full((1, 1, 1, 1), 2.0)}, root / "weights" / "toynet" / "toy.pth")
        expected = float(np.mean([2 * np.maximum(i, 0).max() for i in images]))
        return KnownAnswer(root / "data", root / "weights", {"mean_peak": expected}, 1e-6, "smoke")


SLICE = ToySlice()
'''

TOY_YAML = '''
model: toynet
slice: toyslice
networks:
  doubler:
    inputs: {x: {shape: [batch, 1, 8, 8]}}
    outputs: {y: {atol: 1.0e-5, rtol: 1.0e-5}}
    decoded: {peak: {atol: 1.0e-5, rtol: 0}}
    opset: {torchscript: 17, dynamo: 18}
    checkpoint: {files: [toy.pth]}
profiles:
  smoke: {batch_sizes: [1, 2]}
accuracy:
  metric: mean_peak
  target: 1.0
  higher_is_better: true
  data: [toy/images.npy]
  agreement: {mean_peak: 1.0e-5}
  agreement_samples: 2
throughput: {unit: fps, items_per_call: [batch], cpu_speedup_vs_torch: 0.0}
'''


@pytest.fixture
def toy_project(pytester, monkeypatch, tmp_path):
    (pytester.path / "baselines").mkdir()
    (pytester.path / "baselines" / "toynet.yaml").write_text(TOY_YAML)
    (pytester.path / "toyslice.py").write_text(TOY_SLICE)
    (pytester.path / "test_toynet.py").write_text(textwrap.dedent('''
        from tooling.conformance import ConformanceSuite

        class TestToy(ConformanceSuite):
            model = "toynet"
    '''))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # the inner run is a plain session
    monkeypatch.delenv("ZOO_SESSION_ID", raising=False)  # and not a pass of the CI session running this test
    monkeypatch.setenv("ZOO_BASELINES_DIR", str(pytester.path / "baselines"))
    monkeypatch.setenv("ZOO_FIXTURES_DIR", str(pytester.path / "fixtures"))
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}{os.pathsep}{PROJECT_ROOT}")
    return pytester


@pytest.fixture
def toy_yaml() -> str:
    return TOY_YAML


@pytest.fixture
def toy_known_answer(tmp_path):
    """``stage(project)``: the toy slice's known-answer set, written as staged data and weights roots."""
    def stage(project):
        sys.path.insert(0, str(project.path))
        sys.modules.pop("toyslice", None)  # this project's slice, as written now
        try:
            import toyslice
        finally:
            sys.path.remove(str(project.path))
            sys.modules.pop("toyslice", None)
        return toyslice.SLICE.make_known_answer(tmp_path / "staged")

    return stage
