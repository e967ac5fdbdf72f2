"""Upstream sources: a checkout of the pinned commit with the project's patches applied.

A model may need more than one upstream repository (FOMM: first-order-model for its networks, the
pose network's repository for the one that scores them). The yaml's ``upstream`` maps each checkout's
name to its repository, pinned commit, the packages its code imports and the networks built from it
(default: every network no other checkout lists). The name is the model's, or starts with it and a
dash, so checkouts of different models never share a name; it names everything about the checkout:

    <upstream-root>/<name>/  a staged clone, or  <upstream-root>/<name>.git  a bare mirror
    ZOO_UPSTREAM_URL_<NAME>  a reachable mirror instead (name upper-cased, dashes as underscores)
    patches/<name>/          the project's patches for it
    <cache>/upstream/<name>-<commit>-<patches digest>/   the patched tree

The patched tree is built once behind a lock, published with an atomic rename and marked complete
by a manifest, so a build killed half-way is never reused. A mirror that lacks some blobs (a
snapshot or partial clone without its large files: GIFs, checkpoints) still serves the pinned
commit when every absent file is data rather than code: the manifest lists them, and a missing
source file is an error naming it.

Patches: ``*.patch`` files go through ``git apply`` in name order; ``*.py`` files are hooks with
``on_import(root, import_module)`` that run once, after the checkout is importable, to adjust the
imported upstream package in memory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import threading
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Mapping

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tooling.cache import build_lock, check_tree, read_manifest, remove_stale_staging, tree_files
from tooling.model_spec import PATCHES_DIR, PROJECT_ROOT
from tooling.tools import ToolTimeout, run_tool

MANIFEST = ".zoo-source.json"


class UpstreamError(RuntimeError):
    """The upstream source could not be found, fetched or patched."""


class UpstreamNotStaged(UpstreamError):
    """Nothing to build the upstream source from; the message says what to stage and where."""


class UpstreamDependencyMissing(UpstreamError):
    """The upstream source is there but a package its code imports is not installed: a setup
    error of a host that staged it (not a reason to skip), so the message says what to install."""


# Packages upstream code imports (yacs, ...) are pinned once, in pyproject.toml's [upstream] extra;
# baselines/<model>.yaml names the ones each upstream needs under upstream.requires.
UPSTREAM_EXTRA = "upstream"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"


@dataclass(frozen=True)
class DependencyStatus:
    requirement: Requirement  # the pin from the [upstream] extra
    installed: str | None  # installed version, None when absent

    @property
    def ok(self) -> bool:
        return self.installed is not None and self.requirement.specifier.contains(self.installed, prereleases=True)

    def problem(self) -> str:
        found = "not installed" if self.installed is None else f"{self.installed} installed"
        return f"{self.requirement} ({found})"


def upstream_pins(pyproject: Path | None = None) -> dict[str, Requirement]:
    """The [upstream] extra of pyproject.toml, by canonical package name."""
    pyproject = pyproject or PYPROJECT
    try:
        extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise UpstreamError(f"{pyproject}: cannot read the [{UPSTREAM_EXTRA}] extra ({exc})") from exc
    return {canonicalize_name(r.name): r for r in map(Requirement, extras.get(UPSTREAM_EXTRA, []))}


def dependency_status(names: tuple[str, ...], pyproject: Path | None = None) -> list[DependencyStatus]:
    """Installed or not, for each package ``names`` lists, against its pin in the [upstream] extra."""
    pyproject = pyproject or PYPROJECT
    pins = upstream_pins(pyproject)
    undeclared = [n for n in names if canonicalize_name(n) not in pins]
    if undeclared:
        raise UpstreamError(
            f"{pyproject}: the [{UPSTREAM_EXTRA}] extra does not pin {', '.join(undeclared)}, "
            "which a baseline's upstream.requires names"
        )
    statuses = []
    for name in names:
        requirement = pins[canonicalize_name(name)]
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        statuses.append(DependencyStatus(requirement, installed))
    return statuses


def install_command(statuses: list[DependencyStatus]) -> str:
    pins = " ".join(f"'{s.requirement}'" for s in statuses)
    return f"pip install {pins}"


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


GIT_TIMEOUT_S = 600  # a clone or fetch of an upstream repository; a hung one fails the test


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        proc = run_tool(["git", *args], cwd=cwd, timeout_s=GIT_TIMEOUT_S)
    except (ToolTimeout, OSError) as exc:
        raise UpstreamError(str(exc)) from exc
    if proc.returncode != 0:
        where = f" in {cwd}" if cwd else ""
        raise UpstreamError(f"git {' '.join(args)}{where} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


@dataclass
class UpstreamCheckout:
    """A patched upstream tree that can be imported from, in isolation from other checkouts.

    HRNet-family repositories all ship top-level ``config``, ``models``, ``utils`` packages (under
    ``lib/``), so two checkouts imported into one process would share one module table and the
    second would get the first one's code. Each checkout therefore keeps its own module table:
    while one of its imports runs, ``sys.modules`` holds that table (other checkouts' modules of the
    same names are set aside) and ``sys.path`` has its import root first; afterwards the previous
    state is put back, so imports in any order, and any number of checkouts, give the same modules.
    """

    root: Path
    commit: str
    hooks: list[Path] = field(default_factory=list)
    absent: tuple[str, ...] = ()  # files of the commit the staged mirror did not carry (data, never code)
    # What serves an upstream import this host cannot satisfy (module name -> description),
    # recorded so a verdict says which parts of "upstream" were not upstream's own dependency.
    stand_ins: dict[str, str] = field(default_factory=dict)
    _hooks_ran: bool = False
    _modules: dict[str, ModuleType] = field(default_factory=dict, repr=False)
    _active: bool = field(default=False, repr=False)

    def import_module(
        self, name: str, subdir: str = "", stand_ins: Mapping[str, tuple[ModuleType, str]] | None = None
    ) -> ModuleType:
        """Import ``name`` from the checkout (or from ``subdir`` of it, for repos laid out as lib/).

        ``stand_ins`` maps module names the upstream code imports to (module, description) served
        in their place for this checkout only (e.g. ``torchvision.ops`` where torchvision cannot
        be installed); they never become visible to other code in the process.
        """
        with self._own_modules(self.root / subdir, stand_ins or {}):
            module = importlib.import_module(name)
            if not self._belongs(module):
                origin = getattr(module, "__file__", None) or module
                raise UpstreamError(
                    f"importing {name!r} resolved to {origin}, not to the upstream checkout {self.root}; "
                    "the checkout has no such module"
                )
            if not self._hooks_ran:
                self._hooks_ran = True
                for hook in self.hooks:
                    _run_hook(hook, self)
        return module

    def _belongs(self, module: ModuleType) -> bool:
        root = self.root.resolve()
        locations = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
        return any(loc and (root == Path(loc).resolve() or root in Path(loc).resolve().parents) for loc in locations)

    @contextmanager
    def _own_modules(self, import_root: Path, stand_ins: Mapping[str, tuple[ModuleType, str]]):
        if self._active:  # a hook importing more of the same checkout: already in place
            if str(import_root) not in sys.path:
                sys.path.insert(0, str(import_root))
            yield
            return
        with _IMPORT_LOCK:
            saved_path = list(sys.path)
            provided = _top_level_names(import_root) | {n.split(".")[0] for n in self._modules}
            provided |= {n.split(".")[0] for n in stand_ins}
            set_aside = {n: m for n, m in sys.modules.items() if n.split(".")[0] in provided}
            for name in set_aside:
                del sys.modules[name]
            sys.modules.update(self._modules)
            for name, (module, description) in stand_ins.items():
                self._modules[name] = sys.modules[name] = module
                self.stand_ins[name] = description
            sys.path.insert(0, str(import_root))
            before = set(sys.modules)
            self._active = True
            try:
                yield
            finally:
                self._active = False
                # What this import added that is the checkout's own goes to its table; what it added
                # from site-packages (yacs, ...) stays loaded for everyone, as any import would.
                for name in [n for n in sys.modules if n in self._modules or n not in before]:
                    if name in self._modules or self._belongs(sys.modules[name]):
                        self._modules[name] = sys.modules.pop(name)
                sys.modules.update(set_aside)
                sys.path[:] = saved_path


_IMPORT_LOCK = threading.RLock()


def _top_level_names(import_root: Path) -> set[str]:
    """Module and package names an import root provides (what it would shadow or be shadowed by)."""
    names = set()
    for path in import_root.iterdir() if import_root.is_dir() else ():
        if path.suffix == ".py" and path.stem.isidentifier():
            names.add(path.stem)
        elif path.is_dir() and path.name.isidentifier():
            names.add(path.name)
    return names


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
    requires: tuple[str, ...] = ()  # packages the upstream code imports, pinned in the [upstream] extra
    name: str = ""  # the checkout's name (staging directory, cache entry); default: the model's
    networks: tuple[str, ...] | None = None  # the networks built from it; None: every one no other checkout lists

    def __post_init__(self) -> None:
        self.name = self.name or self.model

    @property
    def env_var(self) -> str:
        return "ZOO_UPSTREAM_URL_" + self.name.upper().replace("-", "_").replace(".", "_")

    def staged_paths(self, upstream_root: Path | None) -> tuple[Path, Path]:
        """Where a clone and where a bare mirror of this checkout's repository are expected."""
        base = upstream_root or Path("<--upstream-root>")
        return base / self.name, base / f"{self.name}.git"

    def what(self) -> str:
        return f"{self.repository or self.name} @ {self.commit[:12]}"

    def origin(self, upstream_root: Path | None) -> str:
        """Where to take the pinned commit from; raises UpstreamNotStaged with what to stage."""
        clone, mirror = self.staged_paths(upstream_root)
        if upstream_root is not None:
            for candidate in (clone, mirror):
                if candidate.is_dir():
                    return str(candidate)
        env_url = os.environ.get(self.env_var)
        if env_url:
            return env_url
        serves = f" (for {', '.join(self.networks)})" if self.networks else ""
        raise UpstreamNotStaged(
            f"upstream {self.name}{serves} not staged: clone {self.repository} (commit {self.commit[:12]}) "
            f"to {clone} or a bare mirror to {mirror}, or set {self.env_var} to a reachable mirror"
        )

    def checkout(self, cache_dir: Path, upstream_root: Path | None, rebuild: bool = False,
                 run_id: str | None = None) -> UpstreamCheckout:
        """The patched tree, built if missing or damaged; ``rebuild`` forces a fresh one once per
        ``run_id`` (xdist workers of one run share it: a sibling's fresh checkout is not torn down)."""
        digest = patches_digest(self.patches_dir)
        target = cache_dir / "upstream" / f"{self.name}-{self.commit[:12]}-{digest}"
        hooks = [p for p in patch_files(self.patches_dir) if p.suffix == ".py"]
        # An intact checkout needs no lock, so a read-only cache still serves it.
        def forced() -> bool:
            return rebuild and (run_id is None or read_manifest(target / MANIFEST).get("run") != run_id)

        if forced() or self._problem(target, digest) is not None:
            def not_writable(why: str) -> UpstreamError:
                return UpstreamError(f"cache dir {cache_dir} is not writable: cannot check out upstream "
                                     f"{self.name} ({why}); use a writable --cache-dir")

            with build_lock(target, f"check out upstream {self.name}", not_writable):
                problem = "forced rebuild (--rebuild)" if forced() else self._problem(target, digest)
                if problem is not None:
                    origin = self.origin(upstream_root)
                    remove_stale_staging(target)
                    shutil.rmtree(target, ignore_errors=True)
                    self._build(origin, target, digest, run_id)
        self.check_dependencies()
        absent = tuple(read_manifest(target / MANIFEST).get("absent", ()))
        return UpstreamCheckout(target, self.commit, hooks, absent=absent)

    def check_dependencies(self) -> None:
        """Raise UpstreamDependencyMissing naming each missing package and the command installing it."""
        missing = [s for s in dependency_status(self.requires) if not s.ok]
        if missing:
            raise UpstreamDependencyMissing(
                f"upstream {self.name} is staged but its code needs {', '.join(s.problem() for s in missing)}: "
                f"install with `{install_command(missing)}` (all upstream dependencies: "
                f"`pip install -e '.[{UPSTREAM_EXTRA}]'`)"
            )

    def _problem(self, target: Path, digest: str) -> str | None:
        """None when the cached checkout is the pinned, patched tree with every file intact."""
        manifest = target / MANIFEST
        if not manifest.is_file():
            return "not checked out" if not target.exists() else "incomplete (no manifest)"
        try:
            recorded = json.loads(manifest.read_text())
        except (ValueError, OSError):
            return "corrupt manifest"
        if not isinstance(recorded, dict) or recorded.get("commit") != self.commit or recorded.get("patches") != digest:
            return "manifest for another commit or patch set"
        # A file deleted or edited in the cached tree would change what the upstream gate runs.
        return check_tree(target, recorded.get("files"), "manifest")

    def _build(self, origin: str, target: Path, digest: str, run_id: str | None = None) -> None:
        staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            _git("clone", "--quiet", "--no-checkout", origin, str(staging))
            try:
                _git("cat-file", "-e", f"{self.commit}^{{commit}}", cwd=staging)
            except UpstreamError as exc:
                raise UpstreamError(
                    f"{origin} does not contain the pinned commit {self.commit} of {self.name}: {exc}"
                ) from exc
            absent = _absent_files(staging, self.commit)
            code = [path for path in absent if Path(path).suffix.lower() in CODE_SUFFIXES]
            if code:
                raise UpstreamError(
                    f"{origin} lacks the contents of {len(code)} source file(s) of {self.name}@{self.commit[:12]} "
                    f"({', '.join(code[:5])}{', ...' if len(code) > 5 else ''}): stage a complete clone or mirror"
                )
            if absent:  # check out everything else: git then never asks for the missing blobs
                patterns = ["/*", *(f"!/{_escape_pattern(path)}" for path in absent)]
                info = Path(_git("rev-parse", "--git-path", "info", cwd=staging))
                info = info if info.is_absolute() else staging / info
                info.mkdir(parents=True, exist_ok=True)
                (info / "sparse-checkout").write_text("\n".join(patterns) + "\n")
                _git("config", "core.sparseCheckout", "true", cwd=staging)
            _git("checkout", "--quiet", "--detach", self.commit, cwd=staging)
            for patch in patch_files(self.patches_dir):
                if patch.suffix == ".patch":
                    try:
                        _git("apply", "--whitespace=nowarn", str(patch.resolve()), cwd=staging)
                    except UpstreamError as exc:
                        raise UpstreamError(f"{patch}: does not apply to {self.name}@{self.commit[:12]}: {exc}") from exc
            shutil.rmtree(staging / ".git")
            (staging / MANIFEST).write_text(json.dumps({
                "model": self.model, "name": self.name, "origin": origin, "commit": self.commit, "patches": digest,
                "run": run_id, "files": tree_files(staging, skip=(MANIFEST,)), "absent": absent,
            }))
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# Files a checkout cannot do without: code, and the configs code reads. Anything else (images,
# videos, checkpoints) may be absent from a mirror that dropped large blobs.
CODE_SUFFIXES = frozenset({".py", ".pyx", ".pxd", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp",
                           ".yaml", ".yml", ".json", ".cfg", ".ini", ".toml", ".sh"})


def _absent_files(repo: Path, commit: str) -> list[str]:
    """Paths in ``commit`` whose blob the repository does not hold (sorted)."""
    present = {line.split(" ", 1)[0] for line in _git("cat-file", "--batch-all-objects", "--batch-check", cwd=repo).splitlines()}
    absent = []
    for entry in _git("ls-tree", "-r", "-z", "--full-tree", commit, cwd=repo).split("\0"):
        if not entry:
            continue
        meta, path = entry.split("\t", 1)
        _mode, kind, sha = meta.split()
        if kind == "blob" and sha not in present:
            absent.append(path)
    return sorted(absent)


def _escape_pattern(path: str) -> str:
    """A path as a literal sparse-checkout (gitignore) pattern."""
    escaped = "".join("\\" + c if c in "\\*?[" else c for c in path)
    return escaped[:-1] + "\\ " if escaped.endswith(" ") else escaped


def upstream_sources(spec) -> dict[str, UpstreamSource]:
    """Every upstream checkout the yaml pins for ``spec``, by name (empty when none is pinned)."""
    return {
        name: UpstreamSource(spec.name, up.get("repository", ""), up["commit"], PATCHES_DIR / name,
                             tuple(up.get("requires", ())), name,
                             tuple(up["networks"]) if up.get("networks") else None)
        for name, up in (spec.upstream or {}).items()
    }


def upstream_source(spec, network: str) -> UpstreamSource | None:
    """The checkout ``network`` is built from: the one listing it, else the one listing no networks."""
    sources = upstream_sources(spec).values()
    return next((s for s in sources if s.networks and network in s.networks), None) or \
        next((s for s in sources if not s.networks), None)


def build_from_experiment(checkout: UpstreamCheckout, model_module: str, experiment: str, *args,
                          stand_ins: Mapping[str, tuple[ModuleType, str]] | None = None):
    """Build a model the way HRNet-family repositories do: yacs config from ``lib/config``, merged
    with an experiment yaml, passed to ``lib/<model_module>.get_pose_net(cfg, *args, is_train=False)``."""
    config = checkout.import_module("config", subdir="lib", stand_ins=stand_ins)
    cfg = config.cfg.clone()
    cfg.defrost()
    cfg.merge_from_file(str(checkout.root / experiment))
    builder = checkout.import_module(model_module, subdir="lib", stand_ins=stand_ins).get_pose_net
    return builder(cfg, *args, is_train=False).eval()
