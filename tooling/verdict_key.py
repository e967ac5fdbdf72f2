"""What a gate's verdict depends on: the one place that says it, as a key per gate instance.

A gate instance is one row of the conformance grid (model, gate, case, backend). Its key hashes
every input its verdict can depend on, each identified by content with the fingerprints the
artifact cache and the resumable accuracy passes already use (``tooling/fingerprint.py``):

- code: every engine module the suite's entry points import, the model's slice with the shared
  stacks it imports (``source_digest``), the test module and the conftest files and pyproject.toml
  above it;
- the model's yaml, restricted to what the row reads (the networks it runs, the tolerance entries
  of the backends it uses, their chains), and the model's fixture files (goldens: only the
  golden gate's own file);
- staged inputs the gate reads (``Gate.reads``): checkpoints, dataset files, the upstream pin and
  patches, each by content;
- options that change results (threads, weights mode and salt, exporters, device);
- library versions (pyproject's pins as installed) and, per backend the row uses (``Gate.uses``
  plus the row's own), its availability here and its tool versions (``Backend.versions``, what
  its artifact keys hold);
- for timed gates (``Gate.timed``), the host's CPU model and core count.

The fields of every artifact key a row builds (``ModelHandle.onnx`` and ``session``: code digests,
weights, dims, opset, variant, versions, settings) are functions of these inputs, so a changed
artifact key implies a changed verdict key; the artifacts themselves are never built to key a
verdict. ``VerdictKey.inputs`` keeps each component, so a miss can say what changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Mapping

import yaml
from packaging.requirements import Requirement

from tooling import baseline
from tooling import model_spec as model_specs
from tooling.backends import BACKENDS
from tooling.cache import LOCK_TIMEOUT_ENV
from tooling.fingerprint import ENGINE_PACKAGE, content_digest, engine_imports, file_digest, source_files, source_label
from tooling.gates import GATES, gate_backends, serving_backends
from tooling.history.session import SESSION_ENV
from tooling.lease import HOST_ENV, LEASE_TIMEOUT_ENV
from tooling.locations import Roots, data_paths, find_checkpoint
from tooling.sources import patches_digest
from tooling.triage import TRIAGE_MEMORY_ENV

# The suite's entry points: the gate bodies and the plugin. Their import closure is the engine a
# verdict runs (workspace, backends, export, compare, ...); the slice adds the model's own code.
ENGINE_ENTRY_POINTS = ("tooling.pytest_plugin", "tooling.conformance")
GOLDEN_DIR = "golden"
FORMAT = 1


@dataclass(frozen=True)
class GateInstance:
    """One row of the grid, as the plugin parametrized it."""

    model: str
    gate: str  # label in tooling/gates.py GATES
    params: Mapping[str, Any]  # the test's parameters: case, chain_case, golden, backend names
    nodeid: str
    test_files: tuple[Path, ...] = ()  # the test module, its conftest files, pyproject.toml


@dataclass(frozen=True)
class VerdictKey:
    digest: str
    inputs: dict[str, Any]
    timed: bool

    def changed(self, previous: Mapping[str, Any]) -> list[str]:
        """Names of the components that differ from ``previous`` inputs (a stored entry's)."""
        return sorted(k for k in self.inputs.keys() | previous.keys() if self.inputs.get(k) != previous.get(k))


def verdict_key(instance: GateInstance, workspace) -> VerdictKey:
    """The key of ``instance``'s verdict in the run ``workspace`` (its roots, options and
    backends) describes; nothing is built or run to compute it."""
    roots, options = workspace.roots, workspace.options
    gate = GATES[instance.gate]
    spec = baseline.load_model_spec(instance.model)
    params = dict(instance.params)
    networks = networks_used(spec, params)
    backends = backends_used(gate, spec, params, options.nightly)
    inputs: dict[str, Any] = {
        "format": FORMAT,
        "node": instance.nodeid,
        "model": instance.model,
        "gate": instance.gate,
        "params": _plain(params),
        "code": code_digests(*ENGINE_ENTRY_POINTS, spec.slice_module, test_files=instance.test_files),
        "yaml": _yaml_digest(instance.model, networks, backends),
        "fixtures": fixtures_digest(spec, params.get("golden")),
        "options": {"threads": options.threads, "weights": options.weights, "salt": options.salt,
                    "exporters": options.exporters, "device": options.device},
        "libraries": library_versions(),
        "backends": {name: backend_state(workspace, name) for name in backends},
    }
    if "checkpoints" in gate.reads and options.weights != "seeded":
        inputs["checkpoints"] = {n: content_digest(find_checkpoint(spec, n, roots)) for n in networks}
    if "data" in gate.reads:
        inputs["data"] = {name: staged_digest(p) if roots.data_root else None
                          for name, p in data_paths(spec, roots).items()}
    if "upstream" in gate.reads:
        inputs["upstream"] = upstream_state(spec, roots)
    if gate.timed:
        inputs["host"] = host_cpu()
    inputs = _plain(inputs)
    blob = json.dumps(inputs, sort_keys=True).encode()
    return VerdictKey(hashlib.sha256(blob).hexdigest()[:32], inputs, gate.timed)


# ZOO_* variables that name a run or bound a wait, and change no result: the CI and nightly scripts
# export a new ZOO_SESSION_ID per invocation, which kept every slice test from being reused.
# (ZOO_HISTORY, ZOO_REPORTS and ZOO_WORKERS are read by the scripts and the history path alone.)
NOT_RESULT_INPUTS = frozenset({
    SESSION_ENV, HOST_ENV, LEASE_TIMEOUT_ENV, LOCK_TIMEOUT_ENV, TRIAGE_MEMORY_ENV,
    "ZOO_HISTORY", "ZOO_REPORTS", "ZOO_WORKERS",
})


def slice_test_key(nodeid: str, params: Mapping[str, Any], test_files: tuple[Path, ...], workspace,
                   models: tuple[str, ...] = ()) -> VerdictKey:
    """The key of a slice's own test (tests/models/<model>/: ports, processing, export variants),
    which no gate registry describes: conservatively, everything the suite could read. The
    engine behind the suite's entry points, the slices of ``models`` (the models the test is for:
    its directory, its model markers) and every engine module the test files import (with no
    model named: every engine source file), every baseline, fixture and patch, the test module and
    conftests, the library versions, runtimes and toolchains, and the options; the caller reuses
    such a verdict only when nothing is staged (no data, weights or upstream root), since those
    are not hashed."""
    if models:
        imported = [name for path in test_files if path.suffix == ".py" for name in engine_imports(path)]
        code = code_digests(*ENGINE_ENTRY_POINTS, *sorted({_slice_module(m) for m in models}), *imported,
                            test_files=test_files)
    else:
        code = code_digests(ENGINE_PACKAGE, test_files=test_files)
    inputs = {
        "format": FORMAT,
        "node": nodeid,
        "params": _plain(dict(params)),
        "models": list(models),
        "code": code,
        "project": project_digests(),
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("ZOO_") and k not in NOT_RESULT_INPUTS},
        "options": _plain(dataclasses.asdict(workspace.options) | {"run_id": None}),
        "libraries": library_versions(),
        # Runtimes and toolchains by version and path, not by asking each backend (AOTInductor's
        # availability check alone imports Inductor: seconds for every process).
        "runtimes": {name: _installed(name) for name in RUNTIMES_KEYED_BY_BACKEND},
        "tools": {tool: shutil.which(tool) for tool in ("g++", "clang++", "atc", "npu-smi", "nvidia-smi")},
    }
    inputs = _plain(inputs)
    blob = json.dumps(inputs, sort_keys=True).encode()
    return VerdictKey(hashlib.sha256(blob).hexdigest()[:32], inputs, False)


def project_digests() -> dict[str, str | None]:
    """Baselines, fixtures and patches, by content (once per process)."""
    if not _project_digests:
        for name, path in (("baselines", baseline.BASELINES_DIR), ("fixtures", model_specs.FIXTURES_DIR),
                           ("patches", model_specs.PATCHES_DIR)):
            _project_digests[name] = content_digest(path)
    return dict(_project_digests)


def networks_used(spec, params: Mapping[str, Any]) -> list[str]:
    """The networks a row runs: its case's, its golden's, its chain's, or (accuracy) all."""
    case = params.get("case")
    if hasattr(case, "network"):
        return [case.network]
    golden = params.get("golden")
    if isinstance(golden, dict):
        return [golden["network"]]
    chain = params.get("chain_case")
    if hasattr(chain, "chain"):
        return list(spec.chains[chain.chain].networks)
    return list(spec.networks)


def backends_used(gate, spec, params: Mapping[str, Any], nightly: bool = True) -> list[str]:
    """What the gate runs on: its fixed references, the row's backend and, for a gate whose rows
    name no backend (the speed-up gate), every deployed backend it runs the case on (in the tier
    the run selected: ``nightly``)."""
    names = list(gate.uses)
    row = params.get(gate.backend_arg) if gate.backend_arg else None
    if isinstance(row, str):
        names.append(row)
    if gate.serves and not gate.backend_arg:
        case = params.get("case")
        names += serving_backends(spec, case, gate, nightly=nightly) if case is not None else gate_backends(gate, None)
    return list(dict.fromkeys(names))


def staged_digest(path: Path) -> str | None:
    """A staged dataset file or folder by content, walked once per process (COCO val2017 is
    5,000 files; every accuracy row of every model reads its own data paths)."""
    if path not in _staged_digests:
        _staged_digests[path] = content_digest(path)
    return _staged_digests[path]


def backend_state(workspace, name: str) -> dict[str, Any]:
    """Whether ``name`` runs here and, if it does, the tool versions that key its artifacts
    (asked once per process: toolkits and drivers do not change under a running session)."""
    options = workspace.options
    memo = (name, options.backends, options.device, options.threads)
    if memo not in _backend_states:
        _backend_states[memo] = _backend_state(workspace, name)
    return _backend_states[memo]


def _backend_state(workspace, name: str) -> dict[str, Any]:
    if name not in BACKENDS:
        return {"known": False}
    state = workspace.availability(name)
    if not state.ok:
        return {"available": False, "reason": state.reason}
    return {"available": True, "versions": workspace.probe(name)[1]}


def _slice_module(model: str) -> str:
    return baseline.load_model_spec(model).slice_module


def code_digests(*modules: str, test_files: tuple[Path, ...]) -> dict[str, str]:
    """Each source file a row runs, by content: the import closure of ``modules`` (the engine
    behind the suite's entry points, the slice and the shared stacks it imports), the test module
    and the conftest files above it."""
    memo = (modules, tuple(test_files))
    if memo not in _code_digests:  # once per process, as ModelHandle.port_digest is
        files = source_files(*modules)
        digests = {source_label(p): file_digest(p)[:16] for p in files}
        digests.update({_label(p): file_digest(Path(p))[:16] for p in test_files if Path(p).is_file()})
        _code_digests[memo] = digests
    return _code_digests[memo]


_code_digests: dict[tuple, dict[str, str]] = {}
_project_digests: dict[str, str | None] = {}
_backend_states: dict[tuple, dict[str, Any]] = {}
_staged_digests: dict[Path, str | None] = {}


def forget() -> None:
    """Drop what this process memoised (code, backend states, file digests): keys computed next
    see the files and tools as a new run would (imports aside: the engine's import graph is read
    once per process)."""
    from tooling import fingerprint

    _code_digests.clear()
    _project_digests.clear()
    _backend_states.clear()
    _staged_digests.clear()
    fingerprint._digests.clear()


@cache
def library_versions() -> dict[str, str]:
    """Installed versions of the distributions pyproject.toml pins (base and upstream extra);
    backend runtimes (onnxruntime, openvino, ...) are keyed per row by ``Backend.versions``."""
    import tomllib

    pyproject = tomllib.loads((model_specs.PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    names = [Requirement(r).name for r in pyproject.get("dependencies", [])]
    names += [Requirement(r).name for r in pyproject.get("optional-dependencies", {}).get("upstream", [])]
    return {name: _installed(name) for name in sorted(set(names) - set(RUNTIMES_KEYED_BY_BACKEND))}


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Distributions whose version a backend's ``versions()`` reports: keying them only on the rows
# of those backends lets an OpenVINO upgrade rerun the OpenVINO rows and nothing else.
RUNTIMES_KEYED_BY_BACKEND = ("onnxruntime", "openvino")


def host_cpu() -> dict[str, Any]:
    """What a timed verdict was measured on: the CPU model and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores}


def fixtures_digest(spec, golden: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The model's fixture files by content; goldens only where the row compares against one."""
    root = spec.fixtures
    digests = {}
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name != GOLDEN_DIR:
                digests[path.name] = content_digest(path)
    if isinstance(golden, dict):
        digests[f"{GOLDEN_DIR}/{golden['file']}"] = content_digest(root / GOLDEN_DIR / golden["file"])
    return digests


def upstream_state(spec, roots: Roots) -> dict[str, Any]:
    """The pinned upstream commit (content-addressed by git), the patches applied to it and
    whether a source for it is staged here."""
    from tooling.sources import UpstreamNotStaged, upstream_source

    if not spec.upstream.get("commit"):
        return {"commit": None}
    source = upstream_source(spec)
    state: dict[str, Any] = {"commit": source.commit, "patches": patches_digest(source.patches_dir)}
    try:
        state["origin"] = source.origin(roots.upstream_root)
    except UpstreamNotStaged:
        state["origin"] = None
    return state


def _yaml_digest(model: str, networks: list[str], backends: list[str]) -> str:
    """The model's yaml as read now, keeping of ``networks``, ``backend_tolerances`` and
    ``chains`` only the entries the row reads; everything else (profiles, accuracy, throughput)
    is kept whole."""
    path = baseline.BASELINES_DIR / f"{model}.yaml"
    memo = (file_digest(path), tuple(networks), tuple(backends))
    if memo not in _yaml_digests:
        _yaml_digests[memo] = _restricted_digest(_read_yaml(path), networks, backends)
    return _yaml_digests[memo]


def _restricted_digest(raw: dict, networks: list[str], backends: list[str]) -> str:
    raw = dict(raw)
    raw["networks"] = {n: v for n, v in (raw.get("networks") or {}).items() if n in networks}
    raw["backend_tolerances"] = {k: v for k, v in (raw.get("backend_tolerances") or {}).items()
                                 if k.split("@", 1)[0] in backends}
    raw["chains"] = {n: c for n, c in (raw.get("chains") or {}).items()
                     if set(c.get("networks", ())) & set(networks)}
    blob = json.dumps(_plain(raw), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_yaml_memo: dict[str, dict] = {}
_yaml_digests: dict[tuple, str] = {}


def _read_yaml(path: Path) -> dict:
    digest = file_digest(path)
    if digest not in _yaml_memo:
        _yaml_memo[digest] = yaml.safe_load(path.read_text()) or {}
    return _yaml_memo[digest]


def _plain(value: Any) -> Any:
    """``value`` as JSON with sorted string keys can hold it: a dataclass by its fields."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {type(value).__name__: _plain(dataclasses.asdict(value))}
    if callable(value) and hasattr(value, "__qualname__"):
        # A function parameter by name (its code is the test module's, keyed by content); its
        # repr holds a memory address, new in every process, which no run would ever match.
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def _label(path: Path) -> str:
    root = model_specs.PROJECT_ROOT
    path = Path(path).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
