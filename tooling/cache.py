"""Content-addressed artifact cache shared by every xdist worker and every later run.

An artifact lives in ``<cache>/<kind>/<model>/<name>-<key>/`` next to ``manifest.json``. The key is
a hash of everything that determines the artifact's bytes (see ``ArtifactKey``). One process builds
while the others wait on a file lock; the build writes into a private staging directory that is
renamed into place, and the manifest (with each file's size and sha256) is written last. On reuse
the manifest is checked against the files, and a mismatch triggers a rebuild rather than trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock

MANIFEST = "manifest.json"


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


class ArtifactCache:
    def __init__(self, root: Path, rebuild: bool = False):
        self.root = Path(root)
        self.rebuild = rebuild
        self.log: list[BuildLog] = []
        self._rebuilt_this_session: set[str] = set()
        self._verified: set[Path] = set()  # hashing a large file once per process is enough

    def directory(self, key: ArtifactKey) -> Path:
        return self.root / key.kind / key.model / f"{key.name}-{key.digest}"

    def get(self, key: ArtifactKey, build: Callable[[Path], None]) -> Path:
        """Return the artifact directory for ``key``, building it with ``build(staging_dir)`` if needed."""
        target = self.directory(key)
        if target in self._verified:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            forced = self.rebuild and key.digest not in self._rebuilt_this_session
            problem = "forced rebuild" if forced else self.verify(target)
            if problem is None:
                self._verified.add(target)
                self.log.append(BuildLog(key, target, False, 0.0, "reused"))
                return target
            start = time.perf_counter()
            self._build(key, target, build)
            self._rebuilt_this_session.add(key.digest)
            self._verified.add(target)
            self.log.append(BuildLog(key, target, True, time.perf_counter() - start, problem))
        return target

    def verify(self, target: Path) -> str | None:
        """None when the artifact is complete and intact, else why it must be rebuilt."""
        manifest = target / MANIFEST
        if not manifest.is_file():
            return "not built" if not target.exists() else "incomplete (no manifest)"
        try:
            recorded = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return "corrupt manifest"
        for name, meta in recorded.get("files", {}).items():
            path = target / name
            if not path.is_file() or path.stat().st_size != meta["size"]:
                return f"{name} missing or truncated"
            if file_sha256(path) != meta["sha256"]:
                return f"{name} content changed"
        return None

    def _build(self, key: ArtifactKey, target: Path, build: Callable[[Path], None]) -> None:
        staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        try:
            build(staging)
            files = {
                str(p.relative_to(staging)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            if not files:
                raise RuntimeError(f"building {key.kind} artifact {key.name} produced no files")
            (staging / MANIFEST).write_text(
                json.dumps({"key": asdict(key), "digest": key.digest, "files": files}, indent=1, default=str)
            )
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
