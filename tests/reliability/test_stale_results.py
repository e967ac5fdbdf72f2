"""Stale results: a changed input or changed code never resumes an old accuracy pass or reuses an
old artifact, even when sizes and modification times are kept (``cp -p``, in-place rewrites).

The accuracy passes here run through the engine's real staged-data path with the slices' own
known-answer sets; the networks are replaced by oracles so that the probes stay fast.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tooling import planning
from tooling.accuracy import run_accuracy
from tooling.fingerprint import content_digest, source_digest
from tooling.locations import Roots
from tooling.models.videopose3d.network import ONE_SIDED_PAD
from tooling.models.videopose3d.slice import DETECTIONS_2D, write_known_answer
from tooling.progress import ProgressReporter, ResultStore
from tooling.workspace import EXPORT_CODE, Options, Workspace

PROJECT = Path(__file__).resolve().parents[2]


def _vp3d_oracle(calls: list):
    """The network the hand-built known-answer checkpoint implements: depth 0, xy of the input frame."""

    def run(feeds):
        calls.append(1)
        poses = feeds["2d_poses"][:, ONE_SIDED_PAD:-ONE_SIDED_PAD]
        return {"3d_preds": np.concatenate([poses, np.zeros_like(poses[..., :1])], axis=-1)}

    return run


def _score(answer, cache: Path, calls: list) -> float:
    workspace = Workspace(Roots(answer.data_root, answer.weights_root, None, cache), Options())
    metrics = run_accuracy(workspace.model("videopose3d"), "onnxruntime", profile="smoke",
                                                          oracles={"vp3d": _vp3d_oracle(calls)})
    return metrics["mpjpe_p1_mm"]


def _replace_keeping_stat(path: Path, write) -> None:
    """Rewrite ``path`` in place, then restore its size-independent identity as ``cp -p`` would."""
    st = path.stat()
    write(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory):
    return write_known_answer(tmp_path_factory.mktemp("vp3d"))


def test_accuracy_pass_resumes_when_nothing_changed(known_answer, tmp_path):
    first, second = [], []
    score = _score(known_answer, tmp_path, first)
    assert _score(known_answer, tmp_path, second) == score and first and not second


def test_data_rewritten_with_same_size_and_mtime_is_scored_afresh(known_answer, tmp_path):
    shutil.copytree(known_answer.data_root, tmp_path / "data")
    answer = type(known_answer)(**{**known_answer.__dict__, "data_root": tmp_path / "data"})
    path = answer.data_root / DETECTIONS_2D

    def rewrite(p: Path, shift: float) -> None:
        """Uncompressed, so that other values of the same shapes keep the file's size."""
        with np.load(p, allow_pickle=True) as data:
            detections, metadata = data["positions_2d"].item(), data["metadata"].item()
        detections["S9"]["Walking"][0] = detections["S9"]["Walking"][0] + shift
        np.savez(p, positions_2d=detections, metadata=metadata)

    _replace_keeping_stat(path, lambda p: rewrite(p, 0.0))
    stale = _score(answer, tmp_path / "cache", [])
    size = path.stat().st_size
    _replace_keeping_stat(path, lambda p: rewrite(p, 40.0))
    assert path.stat().st_size == size
    calls = []
    fresh = _score(answer, tmp_path / "cache", calls)
    assert calls, "the pass resumed the records of the old data"
    assert fresh == pytest.approx(_score(answer, tmp_path / "clean-cache", []))
    assert fresh != pytest.approx(stale)


def test_checkpoint_copied_over_with_cp_p_is_not_resumed(known_answer, tmp_path):
    shutil.copytree(known_answer.weights_root, tmp_path / "weights")
    answer = type(known_answer)(**{**known_answer.__dict__, "weights_root": tmp_path / "weights"})
    checkpoint = answer.weights_root / "videopose3d" / "model_best.bin"
    state = torch.load(checkpoint, weights_only=True)
    _replace_keeping_stat(checkpoint, lambda p: torch.save(state, p))  # the operator's own copy
    _score(answer, tmp_path / "cache", [])
    for tensor in state["model_pos"].values():
        if tensor.is_floating_point():
            tensor.mul_(0.5)  # in place: same storages, so the same file size
    other = tmp_path / "elsewhere" / checkpoint.name  # torch names the archive's folder after the file
    other.parent.mkdir()
    torch.save(state, other)
    assert other.stat().st_size == checkpoint.stat().st_size  # what made size+mtime fingerprints blind
    _replace_keeping_stat(checkpoint, lambda p: shutil.copyfile(other, p))
    calls = []
    _score(answer, tmp_path / "cache", calls)
    assert calls, "the pass resumed records computed with another checkpoint"
    assert len([p for p in (tmp_path / "cache" / "runs" / "videopose3d").iterdir() if p.is_dir()]) == 2


def test_image_replaced_in_place_changes_the_fingerprint(tmp_path):
    folder = tmp_path / "val2017"
    folder.mkdir()
    for name in ("000000000001.jpg", "000000000002.jpg"):
        (folder / name).write_bytes(os.urandom(2048))
    before = content_digest(folder)
    folder_mtime = folder.stat().st_mtime_ns
    _replace_keeping_stat(folder / "000000000002.jpg", lambda p: p.write_bytes(os.urandom(2048)))
    assert folder.stat().st_mtime_ns == folder_mtime  # the folder's own metadata did not change
    assert content_digest(folder) != before


def test_fingerprints_cover_shared_code_not_only_the_slice():
    from tooling.fingerprint import _closure

    for model, shared in [("transpose", "coco/dataset.py"), ("dekr", "coco/evaluation.py"), ("videopose3d", "slice.py")]:
        files = {p.relative_to(PROJECT / "tooling").as_posix() for p in _closure(f"tooling.models.{model}")}
        assert shared in files, model
    port_files = set().union(*(_closure(m) for m in EXPORT_CODE))
    assert {p.name for p in port_files} >= {"export.py", "seeded.py", "weights.py"}


def test_editing_a_shared_module_changes_the_digest(tmp_path):
    shutil.copytree(PROJECT / "tooling", tmp_path / "tooling", ignore=shutil.ignore_patterns("__pycache__"))
    script = "from tooling.fingerprint import source_digest; print(source_digest('tooling.models.transpose', 'tooling.export'))"

    def digest() -> str:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    before = digest()
    assert before == source_digest("tooling.models.transpose", "tooling.export")
    dataset = tmp_path / "tooling" / "coco" / "dataset.py"
    dataset.write_text(dataset.read_text() + "\n# a change to the shared COCO decoding\n")
    after_coco = digest()
    export = tmp_path / "tooling" / "export.py"
    export.write_text(export.read_text() + "\n# a change to the exporter\n")
    assert len({before, after_coco, digest()}) == 3


def test_rate_and_eta_after_resume_count_only_this_runs_work(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "run", {"probe": 1})
    for i in range(90):
        store.save(f"s{i}", {"x": np.zeros(1)})
    store = ResultStore(tmp_path / "run", {"probe": 1})
    clock = [1000.0]
    monkeypatch.setattr("tooling.progress.time.monotonic", lambda: clock[0])
    stream = io.StringIO()
    report = ProgressReporter("probe", stream=stream, interval=0.0, fresh=lambda: store.computed)
    for i in range(100):
        if i >= 90:
            clock[0] += 10.0  # every fresh sample takes 10 s; the resumed ones are instant loads
        store.cached(f"s{i}", lambda: {"x": np.ones(1)})
        report(i + 1, 100, "samples")
        if i == 94:
            assert stream.getvalue().splitlines()[-1] == "probe: 95/100 samples, 0.10 samples/s, ETA 0:00:50"
    assert store.computed == 10


def test_onnx_artifact_key_covers_shared_engine_code(tmp_path, monkeypatch):
    """The exported graph's cache key holds the digest of every engine module its bytes depend on
    (the slice with what it imports, export, seeding, weights), not only the slice's own files."""
    handle = Workspace(Roots(None, None, None, tmp_path / "cache"), Options(weights="seeded")).model("transpose")
    keys = []

    def record(key, build):
        keys.append(key)
        raise LookupError("key recorded; nothing to export in this probe")

    monkeypatch.setattr(handle.ws.cache, "get", record)
    case = next(c for c in planning.cases(handle.spec) if not c.slow)
    with pytest.raises(LookupError):
        handle.onnx(case)
    assert keys[0].fields["code"] == source_digest("tooling.models.transpose", *EXPORT_CODE)
