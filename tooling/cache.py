"""Content-addressed artifact cache shared by every xdist worker and every later run.

An artifact lives in ``<cache>/<kind>/<model>/<name>-<key>/`` next to ``manifest.json``. The key is
a hash of everything that determines the artifact's bytes (see ``ArtifactKey``). One process builds
while the others wait on a file lock and a lease (saying who holds it, up to a timeout); the lease
holds across hosts sharing the cache and is taken over from a dead host (``tooling.lease``), so an
artifact is built once per fleet, not once per host; the build writes into a
private staging directory that is renamed into place, and the manifest (with each file's size and
sha256) is written last. On reuse the manifest is checked against the files, and a manifest that is
missing, damaged or disagrees with the files triggers a rebuild rather than trust. Staging folders
left by killed builds are removed once their lock is free. ``--rebuild`` rebuilds an artifact once
per run (the run id is shared by xdist workers), not once per process. A read-only cache still
serves intact artifacts; only a build needs write access, and then fails saying so.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from tooling.jsonio import to_json
from tooling.lease import Lease, seconds_from_env

MANIFEST = "manifest.json"
STAGING_MARK = ".tmp-"
LOCK_TIMEOUT_ENV = "ZOO_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 3 * 3600.0  # the longest build (ATC at deploy shapes) stays well below
LOCK_NOTICE_S = 10.0  # how often a waiting process says whom it waits for


class CacheError(RuntimeError):
    """The cache cannot be used as asked (not writable, lock held too long)."""


class CacheNotWritable(CacheError):
    pass


class LockTimeout(CacheError):
    pass


class CacheFull(CacheError):
    """The disk holding the cache ran out of space (or quota) while something was written to it:
    an error of the build, not a verdict on the model."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> OSError | None:
    """The OSError saying the disk is full behind ``exc`` (itself, or a cause or context of it:
    exporters and compilers re-raise it wrapped), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def raise_if_full(exc: BaseException, place: Path, writing: str) -> None:
    """Turn a full disk behind ``exc`` into a ``CacheFull`` naming ``place`` and what was written."""
    full = disk_full(exc)
    if full is not None:
        written = f" ({full.filename})" if full.filename else ""
        raise CacheFull(f"{place}: no space left on its disk while writing {writing}{written} "
                        f"[{errno.errorcode.get(full.errno, full.errno)}]; free space there or use another "
                        "--cache-dir") from exc


@dataclass(frozen=True)
class ArtifactKey:
    kind: str  # onnx, om, aoti, ...
    model: str
    network: str
    name: str  # human-readable part of the directory name
    fields: dict = field(default_factory=dict)  # everything else that changes the bytes

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class BuildLog:
    """What happened when an artifact was requested: built (and how long it took) or reused."""

    key: ArtifactKey
    path: Path
    built: bool
    seconds: float
    reason: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Size and sha256 of every file below ``root`` by relative path (what a manifest records)."""
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() not in skip
    }


def check_tree(root: Path, recorded: object, what: str = "manifest") -> str | None:
    """None when the files below ``root`` match ``recorded`` (from ``tree_files``), else the problem."""
    if not isinstance(recorded, dict) or not recorded:
        return f"damaged {what} (no file list)"
    for name, meta in recorded.items():
        if not isinstance(meta, dict) or not {"size", "sha256"} <= meta.keys():
            return f"damaged {what} (entry {name!r} has no size and sha256)"
        path = root / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return f"{name} missing or truncated"
        if file_sha256(path) != meta["sha256"]:
            return f"{name} content changed"
    return None


def denied(exc: OSError) -> bool:
    """Whether ``exc`` means the place cannot be written (permissions or a read-only mount)."""
    return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def lock_timeout_s() -> float:
    try:
        return seconds_from_env(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S)
    except ValueError as exc:
        raise CacheError(str(exc)) from None


def lease_of(lock_path: Path) -> Path:
    """The base name of the fleet-wide lease that goes with the file lock ``lock_path``."""
    return lock_path.with_suffix(".lease")


def lock_holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, as its lease records it (or why that is not known)."""
    owner = Lease(lease_of(lock_path), "").holder()
    return owner.describe() if owner else "a process that has not said who it is"


@dataclass
class HeldLock:
    """What holding a build lock involved: the lease takeovers it needed (empty: none)."""

    takeovers: list[str] = field(default_factory=list)


@contextlib.contextmanager
def hold_lock(lock_path: Path, what: str, timeout_s: float | None = None,
              notice_s: float = LOCK_NOTICE_S) -> Iterator[HeldLock]:
    """Hold the file lock ``lock_path`` and its fleet-wide lease; while waiting, say every
    ``notice_s`` who holds them, and give up with ``LockTimeout`` after ``timeout_s`` (default
    ``ZOO_LOCK_TIMEOUT`` or three hours). The file lock serialises the processes of one host
    cheaply; the lease (``tooling.lease``) those of hosts that share the cache, and is taken over
    from a holder whose heartbeat stopped (its host died), which the yielded ``HeldLock`` lists."""
    timeout_s = lock_timeout_s() if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    lease = Lease(lease_of(lock_path), what)

    def wait_notice(holder: str) -> None:
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"{lock_path}: still held by {holder} after {timeout_s:.0f} s waiting to {what}; "
                f"stop that process or raise {LOCK_TIMEOUT_ENV}"
            ) from None
        print(f"zoo: waiting to {what}: {lock_path} is held by {holder}", file=sys.stderr, flush=True)

    lock = FileLock(str(lock_path))
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(notice_s, deadline - time.monotonic())), poll_interval=0.05)
            break
        except Timeout:
            wait_notice(lock_holder(lock_path))
    try:
        noticed = time.monotonic()
        while not lease.try_acquire():
            if time.monotonic() - noticed >= notice_s or time.monotonic() >= deadline:
                wait_notice(lease.waiting_for())
                noticed = time.monotonic()
            time.sleep(min(0.2, notice_s))
        try:
            yield HeldLock(list(lease.takeovers))
        finally:
            lease.release()
    finally:
        lock.release()


@contextlib.contextmanager
def build_lock(target: Path, what: str, not_writable: Callable[[str], Exception]) -> Iterator[HeldLock]:
    """Hold the lock that guards building ``target``; where the cache may not be written, raise
    ``not_writable(reason)`` (the caller names the cache and what it could not build)."""
    with contextlib.ExitStack() as stack:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            held = stack.enter_context(hold_lock(Path(str(target) + ".lock"), what))
        except OSError as exc:
            if not denied(exc):
                raise
            raise not_writable(exc.strerror) from None
        yield held


def read_manifest(path: Path) -> dict:
    """A build's manifest as recorded, or {} when it is missing or damaged (the build's check says why)."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def remove_stale_staging(target: Path) -> list[Path]:
    """Delete the staging folders of ``target`` that killed builds left (call with its lock held)."""
    stale = sorted(target.parent.glob(f"{target.name}{STAGING_MARK}*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def sweep_stale_staging(directory: Path) -> list[Path]:
    """Delete staging folders below ``directory`` whose build is not running (its lock is free)."""
    removed = []
    for staging in sorted(directory.glob(f"*{STAGING_MARK}*")):
        if not staging.is_dir():
            continue
        target = staging.with_name(staging.name.split(STAGING_MARK, 1)[0])
        lock = FileLock(str(target) + ".lock")
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):
            continue  # a build is running (or the folder is read-only): leave it alone
        if Lease(lease_of(Path(str(target) + ".lock")), "").holder() is not None:
            lock.release()
            continue  # another host builds it (or died doing so: the lease's taker cleans up)
        try:
            removed += remove_stale_staging(target)
        finally:
            lock.release()
    return removed


def check_cache_root(root: Path) -> bool:
    """Whether ``root`` can hold new artifacts: True if writable, False if it exists read-only.
    A path that cannot be a cache at all (a file, or not creatable) raises CacheError naming why."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache dir {root}: exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cache dir {root}: cannot be created ({exc.strerror or exc})") from None
    return os.access(root, os.W_OK | os.X_OK)


class ArtifactCache:
    def __init__(self, root: Path, rebuild: bool = False, run_id: str | None = None):
        self.root = Path(root)
        self.rebuild = rebuild
        # Processes of one run (xdist workers) share the run id, so --rebuild builds each artifact
        # once per run: a manifest stamped with this run was rebuilt by a sibling and is fresh.
        self.run_id = run_id or uuid.uuid4().hex
        self.log: list[BuildLog] = []
        self._verified: set[Path] = set()  # hashing a large file once per process is enough

    def directory(self, key: ArtifactKey) -> Path:
        return self.root / key.kind / key.model / f"{key.name}-{key.digest}"

    def get(self, key: ArtifactKey, build: Callable[[Path], None]) -> Path:
        """Return the artifact directory for ``key``, building it with ``build(staging_dir)`` if needed."""
        target = self.directory(key)
        if target in self._verified:
            return target
        # Lock-free first look: an intact artifact is usable even from a read-only cache.
        problem = self._problem(key, target)
        if problem is None:
            return self._reused(key, target)
        def not_writable(why: str) -> CacheNotWritable:
            return CacheNotWritable(f"cache dir {self.root} is not writable: cannot build {key.kind} artifact "
                                    f"{target.name} ({problem}; {why}); use a writable --cache-dir")

        with build_lock(target, f"build {key.kind} artifact {target.name}", not_writable) as held:
            problem = self._problem(key, target)  # a sibling may have built it while we waited
            if problem is None:
                return self._reused(key, target)
            remove_stale_staging(target)
            start = time.perf_counter()
            self._build(key, target, build)
            self._verified.add(target)
            reason = "; ".join([problem, *held.takeovers])
            self.log.append(BuildLog(key, target, True, time.perf_counter() - start, reason))
        sweep_stale_staging(target.parent)  # leftovers of other artifacts' killed builds
        return target

    def _reused(self, key: ArtifactKey, target: Path) -> Path:
        self._verified.add(target)
        self.log.append(BuildLog(key, target, False, 0.0, "reused"))
        return target

    def _problem(self, key: ArtifactKey, target: Path) -> str | None:
        problem = self.verify(target)
        if problem is None and self.rebuild and read_manifest(target / MANIFEST).get("run") != self.run_id:
            return "forced rebuild (--rebuild)"
        return problem

    def verify(self, target: Path) -> str | None:
        """None when the artifact is complete and intact, else why it must be rebuilt."""
        manifest = target / MANIFEST
        if not manifest.is_file():
            return "not built" if not target.exists() else "incomplete (no manifest)"
        try:
            recorded = json.loads(manifest.read_text())
        except (ValueError, OSError) as exc:
            return f"corrupt manifest ({exc})"
        if not isinstance(recorded, dict):
            return f"damaged manifest (a {type(recorded).__name__}, not an object)"
        if recorded.get("digest") != target.name.rsplit("-", 1)[-1]:
            return "damaged manifest (its key digest does not match the directory)"
        return check_tree(target, recorded.get("files"))

    def _build(self, key: ArtifactKey, target: Path, build: Callable[[Path], None]) -> None:
        staging = target.with_name(f"{target.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}")
        try:
            staging.mkdir(parents=True)
            build(staging)
            files = tree_files(staging)
            if not files:
                raise RuntimeError(f"building {key.kind} artifact {key.name} produced no files")
            (staging / MANIFEST).write_text(to_json(
                {"key": asdict(key), "digest": key.digest, "run": self.run_id, "files": files},
                indent=1, default=str,
            ))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except Exception as exc:
            raise_if_full(exc, self.root, f"{key.kind} artifact {target.name}")
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def rebuilds(self) -> list[BuildLog]:
        return [entry for entry in self.log if entry.built]
