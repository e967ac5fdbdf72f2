"""Faults in the artifact cache and in cached upstream checkouts: recovered from, or a clear error.

Damaged manifests and checkouts are rebuilt (never trusted), killed builds' staging folders are
removed, a held lock says who holds it and gives up after a timeout, a read-only cache still serves
intact artifacts, and ``--rebuild`` rebuilds each artifact once per run however many workers ask.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tooling.accuracy import run_accuracy
from tooling.cache import (
    MANIFEST,
    ArtifactCache,
    ArtifactKey,
    CacheFull,
    CacheNotWritable,
    LockTimeout,
    check_cache_root,
    CacheError,
    hold_lock,
)
from tooling.sources import MANIFEST as SOURCE_MANIFEST
from tooling.sources import UpstreamError, UpstreamSource

KEY = ArtifactKey("onnx", "probe", "net", "net-1x3", {"weights": "w1"})
OTHER = ArtifactKey("onnx", "probe", "net", "net-1x4", {"weights": "w1"})


def _build(log: list, content: bytes = b"graph-bytes"):
    def build(staging: Path) -> None:
        log.append(staging)
        (staging / "model.onnx").write_bytes(content)
    return build


@pytest.mark.parametrize("manifest", [{}, {"digest": "x", "files": {}}, [], {"files": {"model.onnx": 3}}, "null"],
                         ids=["empty-object", "no-files", "a-list", "entry-not-an-object", "null"])
def test_damaged_manifest_is_rebuilt_with_a_reason(tmp_path, manifest):
    builds = []
    target = ArtifactCache(tmp_path).get(KEY, _build(builds))
    (target / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    cache = ArtifactCache(tmp_path)
    assert "manifest" in cache.verify(target)
    cache.get(KEY, _build(builds))
    assert len(builds) == 2 and cache.log[-1].built and "manifest" in cache.log[-1].reason
    assert cache.verify(target) is None


def test_manifest_of_another_artifact_is_not_trusted(tmp_path):
    builds = []
    cache = ArtifactCache(tmp_path)
    target, other = cache.get(KEY, _build(builds)), cache.get(OTHER, _build(builds, b"other"))
    (target / MANIFEST).write_bytes((other / MANIFEST).read_bytes())
    (target / "model.onnx").write_bytes(b"other")
    assert "digest" in ArtifactCache(tmp_path).verify(target)


def test_killed_builds_leave_no_staging_folders(tmp_path):
    cache = ArtifactCache(tmp_path)
    stale_same = Path(str(cache.directory(KEY)) + ".tmp-dead0001")
    stale_other = Path(str(cache.directory(OTHER)) + ".tmp-dead0002")
    for folder in (stale_same, stale_other):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x" * 1000)  # what a SIGKILLed export leaves
    cache.get(KEY, _build([]))
    assert not stale_same.exists() and not stale_other.exists()


HOLDER = """
import sys, time
from pathlib import Path
from tooling.cache import hold_lock
with hold_lock(Path(sys.argv[1]), "build onnx artifact probe-net"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held_lock(tmp_path):
    lock = tmp_path / "net-1x3-abc.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        yield lock, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_held_lock_names_its_holder_and_times_out(held_lock, capsys):
    lock, pid = held_lock
    with pytest.raises(LockTimeout) as info:
        with hold_lock(lock, "build it here", timeout_s=1.0, notice_s=0.3):
            pass
    message = str(info.value)
    assert str(lock) in message and f"pid {pid}" in message and "build onnx artifact probe-net" in message
    assert f"held by pid {pid}" in capsys.readouterr().err  # said while waiting, not only at the end


def test_staging_of_a_running_build_is_left_alone(held_lock):
    lock, _ = held_lock
    running = lock.with_name("net-1x3-abc.tmp-running1")
    running.mkdir()
    from tooling.cache import sweep_stale_staging

    assert sweep_stale_staging(lock.parent) == [] and running.exists()


def test_read_only_cache_serves_intact_artifacts_without_writing(tmp_path, monkeypatch):
    target = ArtifactCache(tmp_path).get(KEY, _build([]))
    for lock in tmp_path.rglob("*.lock"):
        lock.unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert ArtifactCache(tmp_path).get(KEY, _build([])) == target
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # not even a lock file

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(CacheNotWritable, match=rf"cache dir {tmp_path} is not writable: cannot build onnx artifact net-1x4"):
        ArtifactCache(tmp_path).get(OTHER, _build([]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_read_only_cache_by_permissions(tmp_path):
    target = ArtifactCache(tmp_path / "c").get(KEY, _build([]))
    for path in sorted((tmp_path / "c").rglob("*"), reverse=True) + [tmp_path / "c"]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert check_cache_root(tmp_path / "c") is False
        assert ArtifactCache(tmp_path / "c").get(KEY, _build([])) == target
        with pytest.raises(CacheNotWritable):
            ArtifactCache(tmp_path / "c").get(OTHER, _build([]))
    finally:
        for path in [tmp_path / "c", *(tmp_path / "c").rglob("*")]:
            path.chmod(0o755)


def test_impossible_cache_dir_is_an_error_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CacheError, match=f"cache dir {blocker}: exists and is not a directory"):
        check_cache_root(blocker)
    with pytest.raises(CacheError, match=f"cache dir {blocker / 'sub'}: cannot be created"):
        check_cache_root(blocker / "sub")


def test_forced_rebuild_happens_once_per_run_not_per_worker(tmp_path):
    builds = []
    ArtifactCache(tmp_path).get(KEY, _build(builds, b"old"))
    worker_a = ArtifactCache(tmp_path, rebuild=True, run_id="run-1")
    worker_b = ArtifactCache(tmp_path, rebuild=True, run_id="run-1")
    worker_a.get(KEY, _build(builds, b"new"))
    worker_b.get(KEY, _build(builds, b"newer"))
    assert len(builds) == 2 and [e.reason for e in worker_b.log] == ["reused"]
    assert worker_a.log[0].reason == "forced rebuild (--rebuild)"
    ArtifactCache(tmp_path, rebuild=True, run_id="run-2").get(KEY, _build(builds, b"next run"))
    assert len(builds) == 3


# -- upstream checkouts ----------------------------------------------------------------------------
def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def upstream(tmp_path):
    repo = tmp_path / "up" / "probe"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "model.py").write_text("WIDTH = 3\n")
    (repo / "README").write_text("probe\n")
    _git("init", "-q", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("-c", "user.email=p@p", "-c", "user.name=p", "commit", "-qm", "pin", cwd=repo)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return UpstreamSource("probe", "https://example.invalid/probe", commit, tmp_path / "no-patches"), tmp_path / "up"


@pytest.mark.parametrize("damage", ["delete", "edit", "manifest-list"])
def test_damaged_upstream_checkout_is_rebuilt(tmp_path, upstream, damage):
    source, upstream_root = upstream
    checkout = source.checkout(tmp_path / "cache", upstream_root)
    if damage == "delete":
        (checkout.root / "pkg" / "model.py").unlink()
    elif damage == "edit":
        (checkout.root / "pkg" / "model.py").write_text("WIDTH = 4\n")
    else:
        (checkout.root / SOURCE_MANIFEST).write_text("[]")
    again = source.checkout(tmp_path / "cache", upstream_root)
    assert (again.root / "pkg" / "model.py").read_text() == "WIDTH = 3\n"
    assert not list(again.root.parent.glob("*.tmp-*"))


def test_read_only_cache_serves_an_intact_checkout_and_names_itself_otherwise(tmp_path, upstream, monkeypatch):
    source, upstream_root = upstream
    built = source.checkout(tmp_path / "cache", upstream_root)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert source.checkout(tmp_path / "cache", upstream_root).root == built.root
    (built.root / "pkg" / "model.py").unlink()
    with pytest.raises(UpstreamError, match=rf"cache dir {tmp_path / 'cache'} is not writable: cannot check out upstream probe"):
        source.checkout(tmp_path / "cache", upstream_root)


def test_read_only_cache_stops_an_accuracy_pass_by_name(tmp_path, monkeypatch):
    from tooling.locations import Roots
    from tooling.models.videopose3d.slice import write_known_answer
    from tooling.workspace import Options, Workspace

    answer = write_known_answer(tmp_path / "ka")
    handle = Workspace(Roots(answer.data_root, answer.weights_root, None, tmp_path / "cache"), Options()).model("videopose3d")

    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(CacheNotWritable, match=r"runs/videopose3d/\w+: cannot keep the resumable records"):
        run_accuracy(handle, "onnxruntime", profile="smoke")


def test_forced_checkout_rebuild_happens_once_per_run(tmp_path, upstream):
    source, upstream_root = upstream
    first = source.checkout(tmp_path / "cache", upstream_root)
    manifest = first.root / SOURCE_MANIFEST
    source.checkout(tmp_path / "cache", upstream_root, rebuild=True, run_id="run-1")
    stamped = manifest.stat().st_ino
    (first.root / "pkg" / "__pycache__").mkdir()  # what a sibling worker importing from it writes
    source.checkout(tmp_path / "cache", upstream_root, rebuild=True, run_id="run-1")
    assert manifest.stat().st_ino == stamped and (first.root / "pkg" / "__pycache__").is_dir()
    source.checkout(tmp_path / "cache", upstream_root, rebuild=True, run_id="run-2")
    assert not (first.root / "pkg" / "__pycache__").exists()


def test_killed_record_writes_are_removed_and_not_counted(tmp_path):
    import numpy as np

    from tooling.progress import ResultStore

    store = ResultStore(tmp_path / "run", {"probe": 1})
    store.save("a", {"x": np.zeros(1)})
    (tmp_path / "run" / ".b.1234abcd.tmp.npz").write_bytes(b"half a record")
    again = ResultStore(tmp_path / "run", {"probe": 1})
    assert again.resumed == 1 and not list((tmp_path / "run").glob(".*.tmp.npz"))


def _no_space(filename=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "wrapped-by-the-exporter"])
def test_full_disk_during_a_build_names_the_cache_and_what_was_written(tmp_path, wrapped):
    def build(staging: Path) -> None:
        (staging / "model.onnx").write_bytes(b"half a graph")
        if not wrapped:
            raise _no_space(str(staging / "model.onnx"))
        try:
            raise _no_space()
        except OSError as exc:
            raise RuntimeError("export failed: could not write the external data") from exc

    with pytest.raises(CacheFull) as info:
        ArtifactCache(tmp_path).get(KEY, build)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: no space left on its disk while writing onnx artifact net-1x3-")
    assert "ENOSPC" in message and ("model.onnx" in message) != wrapped
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and ".tmp-" in p.name]  # the half build is gone


def test_full_disk_while_saving_an_accuracy_record_names_the_run_folder(tmp_path, monkeypatch):
    from tooling.progress import ResultStore

    store = ResultStore(tmp_path / "run", {"v": 1})

    def savez(path, **arrays):
        Path(path).write_bytes(b"PK")  # a few bytes made it before the disk filled up
        raise _no_space(str(path))

    monkeypatch.setattr("tooling.progress.np.savez", savez)
    with pytest.raises(CacheFull, match=rf"{tmp_path / 'run'}: no space left .* record of sample '001_Walking'"):
        store.save("001_Walking", {"x": np.zeros(2)})
    assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / "fingerprint.json"]
