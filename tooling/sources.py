"""Upstream sources: a checkout of the pinned commit with the project's patches applied.

Where the commit comes from, in order: a staged clone ``<upstream-root>/<model>``, a bare mirror
``<upstream-root>/<model>.git``, or the yaml's repository URL cloned into the cache. The patched
tree is built once under ``<cache>/upstream/`` behind a lock, published with an atomic rename and
marked complete by a manifest, so a build killed half-way is never reused.

Patches live in ``patches/<model>/``: ``*.patch`` files go through ``git apply`` in name order;
``*.py`` files are hooks with ``on_import(root, import_module)`` that run once, after the checkout
is importable, to adjust the imported upstream package in memory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from filelock import FileLock

MANIFEST = ".zoo-source.json"


class UpstreamError(RuntimeError):
    """The upstream source could not be found, fetched or patched."""


class UpstreamNotStaged(UpstreamError):
    """Nothing to build the upstream source from; the message says what to stage and where."""


def patches_digest(patches_dir: Path) -> str:
    h = hashlib.sha256()
    for path in patch_files(patches_dir):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def patch_files(patches_dir: Path) -> list[Path]:
    if not patches_dir.is_dir():
        return []
    return sorted(p for p in patches_dir.iterdir() if p.suffix in (".patch", ".py") and not p.name.startswith("_"))


def _git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        where = f" in {cwd}" if cwd else ""
        raise UpstreamError(f"git {' '.join(args)}{where} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


@dataclass
class UpstreamCheckout:
    """A patched upstream tree that can be imported from."""

    root: Path
    commit: str
    hooks: list[Path] = field(default_factory=list)
    _hooks_ran: bool = False

    def import_module(self, name: str, subdir: str = "") -> ModuleType:
        """Import ``name`` from the checkout (or from ``subdir`` of it, for repos laid out as lib/)."""
        root = str(self.root / subdir)
        if root not in sys.path:
            sys.path.insert(0, root)
        module = importlib.import_module(name)
        origin = Path(getattr(module, "__file__", "") or "").resolve()
        if self.root.resolve() not in origin.parents:
            raise UpstreamError(
                f"importing {name!r} resolved to {origin}, not to the upstream checkout {self.root}; "
                "another package of that name is already imported"
            )
        if not self._hooks_ran:
            self._hooks_ran = True
            for hook in self.hooks:
                _run_hook(hook, self)
        return module


def _run_hook(hook: Path, checkout: UpstreamCheckout) -> None:
    spec = importlib.util.spec_from_file_location(f"zoo_patch_{hook.stem}", hook)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "on_import"):
        raise UpstreamError(f"{hook}: a patch hook must define on_import(root, import_module)")
    module.on_import(checkout.root, checkout.import_module)


@dataclass
class UpstreamSource:
    model: str
    repository: str
    commit: str
    patches_dir: Path

    def origin(self, upstream_root: Path | None) -> str:
        """Where to take the pinned commit from; raises UpstreamNotStaged with what to stage."""
        candidates = []
        if upstream_root is not None:
            candidates = [upstream_root / self.model, upstream_root / f"{self.model}.git"]
            for candidate in candidates:
                if candidate.is_dir():
                    return str(candidate)
        env_url = os.environ.get(f"ZOO_UPSTREAM_URL_{self.model.upper()}")
        if env_url:
            return env_url
        where = " or ".join(str(c) for c in candidates) if candidates else "<--upstream-root>/" + self.model
        raise UpstreamNotStaged(
            f"upstream {self.model} not staged: clone {self.repository} (commit {self.commit[:12]}) to {where}, "
            f"or set ZOO_UPSTREAM_URL_{self.model.upper()} to a reachable mirror"
        )

    def checkout(self, cache_dir: Path, upstream_root: Path | None, rebuild: bool = False) -> UpstreamCheckout:
        digest = patches_digest(self.patches_dir)
        target = cache_dir / "upstream" / f"{self.model}-{self.commit[:12]}-{digest}"
        hooks = [p for p in patch_files(self.patches_dir) if p.suffix == ".py"]
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if rebuild or not self._is_complete(target, digest):
                origin = self.origin(upstream_root)
                shutil.rmtree(target, ignore_errors=True)
                self._build(origin, target, digest)
        return UpstreamCheckout(target, self.commit, hooks)

    def _is_complete(self, target: Path, digest: str) -> bool:
        manifest = target / MANIFEST
        if not manifest.is_file():
            return False
        try:
            recorded = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return False
        return recorded.get("commit") == self.commit and recorded.get("patches") == digest

    def _build(self, origin: str, target: Path, digest: str) -> None:
        staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            _git("clone", "--quiet", "--no-checkout", origin, str(staging))
            try:
                _git("checkout", "--quiet", "--detach", self.commit, cwd=staging)
            except UpstreamError as exc:
                raise UpstreamError(
                    f"{origin} does not contain the pinned commit {self.commit} of {self.model}: {exc}"
                ) from exc
            for patch in patch_files(self.patches_dir):
                if patch.suffix == ".patch":
                    try:
                        _git("apply", "--whitespace=nowarn", str(patch.resolve()), cwd=staging)
                    except UpstreamError as exc:
                        raise UpstreamError(f"{patch}: does not apply to {self.model}@{self.commit[:12]}: {exc}") from exc
            shutil.rmtree(staging / ".git")
            (staging / MANIFEST).write_text(
                json.dumps({"model": self.model, "origin": origin, "commit": self.commit, "patches": digest})
            )
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def upstream_source(spec) -> UpstreamSource:
    up = spec.upstream
    if not up.get("commit"):
        raise UpstreamError(f"baselines/{spec.name}.yaml: upstream.commit is not set")
    return UpstreamSource(spec.name, up.get("repository", ""), up["commit"], spec.patches)


def build_from_experiment(checkout: UpstreamCheckout, model_module: str, experiment: str):
    """Build a model the way HRNet-family repositories do: yacs config from ``lib/config``,
    merged with an experiment yaml, passed to ``lib/<model_module>.get_pose_net``."""
    config = checkout.import_module("config", subdir="lib")
    cfg = config.cfg.clone()
    cfg.defrost()
    cfg.merge_from_file(str(checkout.root / experiment))
    return checkout.import_module(model_module, subdir="lib").get_pose_net(cfg, is_train=False).eval()
