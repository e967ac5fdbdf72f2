"""What a result depends on, identified by content: input files, image folders and engine code.

Resumable accuracy passes and artifact keys are tied to these digests, so a checkpoint copied over
with ``cp -p``, an image replaced in place or an edit to a shared module (the COCO stack, export or
seeding code) starts afresh instead of resuming a stale result. Sizes and mtimes are not identity.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
from functools import cache
from pathlib import Path

from tooling.cache import file_sha256

ENGINE_PACKAGE = "tooling"
ENGINE_ROOT = Path(__file__).resolve().parent

_digests: dict[tuple, str] = {}


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    # ctime cannot be set by cp -p or touch, and changes with every write: a safe memo key.
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, hashed once per process while the file is unchanged."""
    identity = _file_identity(path)
    if identity not in _digests:
        _digests[identity] = file_sha256(path)
    return _digests[identity]


def content_digest(path: Path | None) -> str | None:
    """Identity of a data file, or of a folder as the digest of each file in it (name and bytes);
    None for a path that does not exist."""
    if path is None or not path.exists():
        return None
    path = Path(path)
    if path.is_file():
        return "sha256-" + file_digest(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            member = Path(root, name)
            h.update(member.relative_to(path).as_posix().encode() + b"\0")
            h.update(file_digest(member).encode())
    return "tree-" + h.hexdigest()


def source_digest(*modules: str) -> str:
    """Hash of every engine source file the named modules (or packages) import, directly or not:
    editing any of them, not only the model's own slice, invalidates what was built from them."""
    h = hashlib.sha256()
    for path in source_files(*modules):
        h.update(source_label(path).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def source_files(*modules: str) -> list[Path]:
    """The source files ``source_digest`` hashes, sorted: the import closure of each engine
    module, or the file of a module outside the engine (a slice or backend a test defines)."""
    files = set()
    for module in modules:
        if module.split(".")[0] == ENGINE_PACKAGE:
            files |= _closure(module)
        else:
            loaded = sys.modules.get(module)
            origin = getattr(loaded, "__file__", None)
            if origin is None and loaded is None:  # not imported yet: where an import would find it
                try:
                    origin = getattr(importlib.util.find_spec(module), "origin", None)
                except (ImportError, ValueError):
                    origin = None
            files |= {Path(origin).resolve()} if origin and Path(origin).is_file() else set()
    return sorted(files)


def source_label(path: Path) -> str:
    """A source file's name relative to the project (absolute outside it)."""
    return path.relative_to(ENGINE_ROOT.parent).as_posix() if path.is_relative_to(ENGINE_ROOT.parent) else path.as_posix()


def _module_file(name: str) -> Path:
    """The source file of an engine module, found on disk (importing it could be slow or fail)."""
    parts = name.split(".")
    if parts[0] != ENGINE_PACKAGE:
        raise ModuleNotFoundError(f"{name!r} is not an engine module")
    base = ENGINE_ROOT.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    raise ModuleNotFoundError(f"no engine module {name!r} (looked in {base})")


@cache
def _closure(module: str) -> frozenset[Path]:
    """Engine source files reachable from ``module``; a package brings every module in it."""
    root = _module_file(module)
    if root.name == "__init__.py":
        pending = [module + "." + p.relative_to(root.parent).with_suffix("").as_posix().replace("/", ".")
                   for p in root.parent.rglob("*.py")]
        pending = [name.removesuffix(".__init__") for name in pending]
    else:
        pending = [module]
    seen: set[str] = set()
    files: set[Path] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            path = _module_file(name)
        except (ModuleNotFoundError, ValueError):
            continue  # "from package import name" where name is not a module
        files.add(path)  # an imported package runs only its __init__, which is followed like a module
        pending += _engine_imports(path, name)
    return frozenset(files)


def _engine_imports(path: Path, module: str) -> list[str]:
    names = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    parents = [n.rsplit(".", i)[0] for n in names for i in range(1, n.count("."))]
    return [n for n in names + parents if n == ENGINE_PACKAGE or n.startswith(ENGINE_PACKAGE + ".")]


def engine_imports(path: Path) -> list[str]:
    """The engine modules a file outside the engine (a test module) imports, by absolute name
    (``from tooling.x import name`` names tooling.x, and tooling.x.name only where that is a module)."""
    found = set()
    for name in _engine_imports(Path(path), "_outside_"):
        try:
            _module_file(name)
        except ModuleNotFoundError:
            continue
        found.add(name)
    # The packages above an imported module run only their __init__, which the module's closure
    # follows; named on their own, a package would bring every module in it.
    return sorted(n for n in found if not any(other.startswith(n + ".") for other in found))


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)
