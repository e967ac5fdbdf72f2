"""Artifact cache: built once, reused, verified, rebuilt when damaged, never half-published."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tooling.cache import MANIFEST, ArtifactCache, ArtifactKey

KEY = ArtifactKey("onnx", "demo", "net", "net-1x3", {"weights": "abc", "opset": 18})


def _writer(content: bytes, log: list):
    def build(staging: Path) -> None:
        log.append(staging)
        (staging / "model.onnx").write_bytes(content)

    return build


def test_builds_once_then_reuses(tmp_path):
    builds = []
    first = ArtifactCache(tmp_path).get(KEY, _writer(b"graph", builds))
    second = ArtifactCache(tmp_path).get(KEY, _writer(b"other", builds))
    assert first == second and len(builds) == 1
    assert (first / "model.onnx").read_bytes() == b"graph"
    assert not list(first.parent.glob("*.tmp-*")), "staging directories must not survive a build"


def test_any_key_field_changes_the_location(tmp_path):
    cache = ArtifactCache(tmp_path)
    other = ArtifactKey("onnx", "demo", "net", "net-1x3", {"weights": "abd", "opset": 18})
    assert cache.directory(KEY) != cache.directory(other)


@pytest.mark.parametrize("damage", ["truncate", "rewrite", "drop_manifest", "corrupt_manifest"])
def test_damaged_artifact_is_rebuilt_not_trusted(tmp_path, damage):
    builds = []
    target = ArtifactCache(tmp_path).get(KEY, _writer(b"graph-bytes", builds))
    if damage == "truncate":
        (target / "model.onnx").write_bytes(b"gra")
    elif damage == "rewrite":
        (target / "model.onnx").write_bytes(b"GRAPH-BYTES")
    elif damage == "drop_manifest":
        (target / MANIFEST).unlink()
    else:
        (target / MANIFEST).write_text("{not json")
    cache = ArtifactCache(tmp_path)
    assert cache.verify(target) is not None
    cache.get(KEY, _writer(b"graph-bytes", builds))
    assert len(builds) == 2
    assert cache.log[-1].built and cache.verify(target) is None


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = ArtifactCache(tmp_path)

    def explode(staging: Path) -> None:
        (staging / "model.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get(KEY, explode)
    assert not cache.directory(KEY).exists()
    assert [p.name for p in cache.directory(KEY).parent.iterdir()] == [cache.directory(KEY).name + ".lock"]


def test_empty_build_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="produced no files"):
        ArtifactCache(tmp_path).get(KEY, lambda staging: None)


def test_forced_rebuild_happens_once_per_session(tmp_path):
    builds = []
    ArtifactCache(tmp_path).get(KEY, _writer(b"v1", builds))
    forced = ArtifactCache(tmp_path, rebuild=True)
    forced.get(KEY, _writer(b"v2", builds))
    forced.get(KEY, _writer(b"v3", builds))
    assert len(builds) == 2
    assert (forced.directory(KEY) / "model.onnx").read_bytes() == b"v2"


def _build_in_process(root: str, counter: str) -> str:
    def build(staging: Path) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        (staging / "model.onnx").write_bytes(b"shared")

    return str(ArtifactCache(Path(root)).get(KEY, build))


def test_concurrent_processes_build_once(tmp_path):
    counter = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.starmap(_build_in_process, [(str(tmp_path / "cache"), str(counter))] * 3)
    assert len(set(paths)) == 1
    assert len(counter.read_text().splitlines()) == 1
