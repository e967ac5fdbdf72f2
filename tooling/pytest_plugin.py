"""pytest integration: options, the ``zoo`` fixture, gate parametrization and the conformance matrix."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import os
import re
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from tooling import planning
from tooling.backends import BACKENDS
from tooling.accuracy import REFERENCE_BACKEND
from tooling.backends.base import BackendConfig, worker_device
from tooling.baseline import load_model_spec
from tooling.cache import CacheError, check_cache_root
from tooling.agreement import AgreementSet
from tooling.conformance import ConformanceSuite
from tooling.fleet import Fleet, fleet_gateway_alive
from tooling.gates import GateContext, default_accuracy_backends, gate_of
from tooling.history.session import Recorded, history_path, inject, record_run, warm_up
from tooling.history.store import HistoryError
from tooling.locations import ENV, Roots
from tooling.model_spec import EXPORTERS, Case, ChainCase
from tooling.progress import set_live_sink
from tooling.report import ConformanceMatrix, MatrixRow, flat_properties
from tooling.schedule import Durations, LongestFirstScheduling
from tooling.shards import Shard, parse_merge
from tooling.slice import KnownAnswer
from tooling.workspace import Options, Workspace

# The verdict cache's hooks live in their own module (reuse of passes whose inputs did not change).
pytest_plugins = ("tooling.verdict_plugin",)
_matrix_key = pytest.StashKey[ConformanceMatrix]()
_nightly_deselected_key = pytest.StashKey[int]()
_slow_selected_key = pytest.StashKey[bool]()  # the run holds nightly-tier (slow) tests
_idle_required_key = pytest.StashKey[dict[str, str]]()
_workspace_key = pytest.StashKey[Workspace]()
_available_key = pytest.StashKey[Callable[[str], bool]]()
_run_id_key = pytest.StashKey[str]()
_cache_note_key = pytest.StashKey[str]()
_builds_reported_key = pytest.StashKey[int]()
_started_key = pytest.StashKey[float]()
_history_key = pytest.StashKey["Recorded | str"]()
_report_written_key = pytest.StashKey[str]()
_fleet_key = pytest.StashKey[Fleet]()
_durations_key = pytest.StashKey[Durations]()
_required_missing_key = pytest.StashKey[str]()
_empty_gates_key = pytest.StashKey[set]()  # (suite class, test name) of gates with no row for a model


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _deployed_backend_names(raw: str) -> str:
    """Validate a comma-separated list of deployed backends (returned unchanged)."""
    deployed = sorted(n for n, b in BACKENDS.items() if b.deployed)
    names = [b.strip() for b in raw.split(",")]
    for name in names:
        if not name:
            raise argparse.ArgumentTypeError(f"{raw!r} has an empty entry; deployed backends: {', '.join(deployed)}")
        if name not in BACKENDS:
            raise argparse.ArgumentTypeError(f"unknown backend {name!r}; deployed backends: {', '.join(deployed)}")
        if not BACKENDS[name].deployed:
            raise argparse.ArgumentTypeError(
                f"{name!r} is a reference every case runs anyway, not a deployed backend; "
                f"deployed backends: {', '.join(deployed)}")
    return raw


def _shard_count(raw: str) -> int | str:
    return raw if raw == "auto" else _positive_int(raw)


def accuracy_shards(config: pytest.Config) -> int:
    """--accuracy-shards, with 'auto' resolved to the run's xdist workers (the same on the
    controller and every worker, so all collect the same items)."""
    chosen = config.getoption("--accuracy-shards")
    if chosen != "auto":
        return chosen
    try:
        from xdist.workermanage import parse_tx_spec_config

        return max(1, len(parse_tx_spec_config(config)))
    except (ImportError, pytest.UsageError, ValueError):
        return 1  # no xdist, or no workers asked for


def _accuracy_backend_choice(raw: str) -> str:
    """One deployed backend, ``torch`` (the reference pipeline) or ``all`` (every deployed one)."""
    if raw in (REFERENCE_BACKEND, "all"):
        return raw
    if "," in raw:
        raise argparse.ArgumentTypeError(f"{raw!r}: name one backend, {REFERENCE_BACKEND} or all")
    return _deployed_backend_names(raw)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zoo", "zoo-conformance")
    group.addoption("--data-root", help="staged datasets (env ZOO_DATA_ROOT)")
    group.addoption("--weights-root", help="staged checkpoints, <root>/<model>/<file> (env ZOO_WEIGHTS_ROOT)")
    group.addoption("--upstream-root", help="upstream clones <root>/<checkout> or bare mirrors <root>/<checkout>.git, one per checkout a baseline's upstream names (env ZOO_UPSTREAM_ROOT)")
    group.addoption("--cache-dir", help="artifact cache (env ZOO_CACHE_DIR, default .zoo-cache/)")
    group.addoption("--rebuild", action="store_true", help="rebuild every artifact this run touches")
    group.addoption("--exporter", action="append", choices=EXPORTERS, help="restrict to these exporters (repeatable)")
    group.addoption("--backends", type=_deployed_backend_names,
                    help="comma-separated deployed backends to run (default: all available)")
    group.addoption("--threads", type=_positive_int, default=1, help="threads per backend session and for torch (default 1)")
    group.addoption("--weights", choices=("auto", "seeded"), default="auto",
                    help="auto: staged checkpoint when present, else seeded; seeded: always seeded")
    group.addoption("--salt", default="public", help="salt of the seeded weights")
    group.addoption("--device", help="NPU or GPU id for device backends")
    group.addoption("--devices", help="NPU or GPU ids, comma-separated: xdist worker gwN uses id N modulo their count "
                    "(run with -n <count> for one worker per device)")
    group.addoption("--accuracy-limit", type=_positive_int, help="score only the first N samples (a quick look, not gated)")
    group.addoption("--accuracy-backend", type=_accuracy_backend_choice,
                    help="backend for the staged dataset pass: a deployed one, torch (the reference "
                         "pipeline) or all (default: the OM on an NPU host, else one deployed CPU backend)")
    group.addoption("--restart-accuracy", action="store_true", help="discard resumable accuracy results")
    group.addoption("--accuracy-shards", type=_shard_count, default=1,
                    help="split each dataset pass into N shards that xdist workers (devices, hosts) score at once, "
                    "merged by a last item into the unsharded figures; 'auto': one per xdist worker (default 1)")
    group.addoption("--zoo-report", default="reports/conformance.json", help="JSON conformance report path")
    group.addoption("--nightly", action="store_true", default=_env_flag("ZOO_NIGHTLY"),
                    help="also run the nightly tier (tests marked slow: deploy shapes, every batch size); "
                    "without it they are deselected unless -m names slow (env ZOO_NIGHTLY=1)")
    group.addoption("--require-backends", default=os.environ.get("ZOO_REQUIRE_BACKENDS"),
                    help="comma-separated backends this host must have: a gate on one that is unavailable fails "
                    "instead of skipping, and the run fails if one ran no gate (env ZOO_REQUIRE_BACKENDS)")
    group.addoption("--history", default=None,
                    help="run history (SQLite) this run is appended to and compared with (env ZOO_HISTORY, "
                    "default reports/history.sqlite; 'none' turns it off)")
    group.addoption("--fail-on-regression", action="store_true",
                    help="fail the run when it regressed against earlier runs of this host class and versions")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _backend_list(config: pytest.Config, option: str) -> tuple[str, ...] | None:
    chosen = config.getoption(option)
    if not chosen:
        return None
    names = tuple(b.strip() for b in chosen.split(",") if b.strip())
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise pytest.UsageError(f"{option}: unknown {unknown}; known: {sorted(BACKENDS)}")
    return names


def _selected_backends(config: pytest.Config) -> tuple[str, ...] | None:
    return _backend_list(config, "--backends")


def _required_backends(config: pytest.Config) -> tuple[str, ...]:
    required = _backend_list(config, "--require-backends") or ()
    selected = _selected_backends(config)
    if selected is not None and set(required) - set(selected):
        raise pytest.UsageError(f"--require-backends {sorted(set(required) - set(selected))} not in --backends {list(selected)}")
    return required


def _workspace(config: pytest.Config) -> Workspace:
    opt = config.getoption
    roots = Roots.resolve(
        data_root=opt("--data-root"), weights_root=opt("--weights-root"),
        upstream_root=opt("--upstream-root"), cache_dir=opt("--cache-dir"),
    )
    backends = _selected_backends(config)
    if opt("--device") and opt("--devices"):
        raise pytest.UsageError("--device and --devices are exclusive")
    try:
        device = worker_device(opt("--devices") or opt("--device"), getattr(config, "workerinput", {}).get("workerid"))
    except ValueError as exc:
        raise pytest.UsageError(f"--devices: {exc}") from exc
    options = Options(
        threads=opt("--threads"), rebuild=opt("--rebuild"),
        exporters=tuple(opt("--exporter")) if opt("--exporter") else None, backends=backends,
        weights=opt("--weights"), salt=opt("--salt"), device=device,
        accuracy_limit=opt("--accuracy-limit"), restart_accuracy=opt("--restart-accuracy"),
        required_backends=_required_backends(config),
        run_id=config.stash[_run_id_key], nightly=config.stash.get(_slow_selected_key, bool(opt("--nightly"))),
    )
    return Workspace(roots, options)


def _terminal_progress(config: pytest.Config):
    """Progress lines of long passes, written to the terminal with capture suspended, so they show
    while the test runs (-n 0). An xdist worker has no terminal: there the lines stay in the test's
    captured stderr and in progress.txt of the run directory (``tail -f`` it)."""
    if hasattr(config, "workerinput"):
        return None

    def write(line: str) -> None:
        # Looked up per line: the terminal reporter registers itself after this plugin configures.
        terminal = config.pluginmanager.getplugin("terminalreporter")
        capture = config.pluginmanager.getplugin("capturemanager")
        if terminal is None:  # -p no:terminal
            print(line, file=sys.stderr, flush=True)
        elif capture is None:
            terminal.write_line(line)
        else:
            with capture.global_and_fixture_disabled():
                terminal.write_line(line)

    return write


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(BackendCheck(), "zoo-backend-check")
    _required_backends(config)  # a usage error before collection, not in the first test
    set_live_sink(_terminal_progress(config))
    config.stash[_matrix_key] = ConformanceMatrix()
    config.stash[_started_key] = time.time()
    if not hasattr(config, "workerinput") and history_path(config.getoption("--history"), Path(config.rootpath)):
        warm_up()
    # xdist workers share the controller's run id: --rebuild then rebuilds once per run.
    config.stash[_run_id_key] = getattr(config, "workerinput", {}).get("testrunuid") or uuid.uuid4().hex
    cache_dir = Roots.resolve(cache_dir=config.getoption("--cache-dir")).cache_dir
    try:
        writable = check_cache_root(cache_dir)
    except CacheError as exc:
        raise pytest.UsageError(f"--cache-dir: {exc}") from None
    if not writable:
        config.stash[_cache_note_key] = (
            f"cache dir {cache_dir} is read-only: intact artifacts are used, anything to build fails")
    if not hasattr(config, "workerinput") and not config.option.collectonly:
        _check_report_path(_report_path(config))
    torch.set_num_threads(config.getoption("--threads"))
    if not hasattr(config, "workerinput") and not config.option.collectonly:
        config.stash[_durations_key] = Durations(cache_dir)


def _report_path(config: pytest.Config) -> Path:
    path = Path(config.getoption("--zoo-report"))
    return path if path.is_absolute() else Path(config.rootpath) / path


def _check_report_path(path: Path) -> None:
    """The JSON report can be written where it is asked for, checked before any test runs (a
    read-only checkout would otherwise end a passing run in a traceback from the writer)."""
    if path.is_dir():
        raise pytest.UsageError(f"--zoo-report {path}: is a directory; give the report's file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise pytest.UsageError(
            f"--zoo-report {path}: {path.parent} cannot be written ({exc.strerror or exc}); "
            "pass a writable --zoo-report path") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    note = config.stash.get(_cache_note_key, None)
    return ([f"zoo: {note}"] if note else []) + [f"zoo: {_staged_accuracy_line(config)}"]


def _available_deployed(config: pytest.Config) -> Callable[[str], bool]:
    """Whether a selected deployed backend runs on this host, each checked at most once a session."""
    if _available_key not in config.stash:
        selected, threads, known = _selected_backends(config), config.getoption("--threads"), {}

        def available(name: str) -> bool:
            if name not in known:
                known[name] = (selected is None or name in selected) and \
                    BACKENDS[name](BackendConfig(threads=threads)).availability().ok
            return known[name]

        config.stash[_available_key] = available
    return config.stash[_available_key]


def _staged_accuracy_line(config: pytest.Config) -> str:
    """Which backends a staged accuracy pass runs on in this run, and why."""
    chosen = config.getoption("--accuracy-backend")
    if chosen == "all":
        return "staged accuracy on every deployed backend that serves the profile (--accuracy-backend all)"
    if chosen == REFERENCE_BACKEND:
        return "staged accuracy on torch eager, the reference pipeline (--accuracy-backend torch)"
    if chosen is not None:
        return f"staged accuracy on {chosen} (--accuracy-backend)"
    available = _available_deployed(config)
    deployed = [n for n, cls in BACKENDS.items() if cls.deployed and (_selected_backends(config) is None
                                                                       or n in _selected_backends(config))]
    default = default_accuracy_backends(deployed, available)
    host = "an NPU host" if default == ["om"] else "no NPU here"
    return (f"staged accuracy on {', '.join(default) or 'no backend'} by default ({host}; one backend per "
            f"pass; --accuracy-backend all|torch|<backend> to choose)")


def _session_workspace(config: pytest.Config) -> Workspace:
    """The process's one workspace: the ``zoo`` fixture's, and the one the backend check asks."""
    if _workspace_key not in config.stash:
        config.stash[_workspace_key] = _workspace(config)
    return config.stash[_workspace_key]


@pytest.fixture(scope="session")
def zoo(pytestconfig) -> Workspace:
    return _session_workspace(pytestconfig)


@pytest.fixture(scope="session")
def known_answers(zoo, tmp_path_factory) -> Callable[[str], KnownAnswer]:
    """Each model's generated known-answer set, written once per model handle (kept in its memo,
    so released with it) and read by every gate that scores it (the known answer, and the
    agreement gate on each backend)."""

    def known_answer(model: str) -> KnownAnswer:
        memo = zoo.model(model).memo
        if "known_answer" not in memo:
            memo["known_answer"] = zoo.model(model).slice.make_known_answer(
                tmp_path_factory.mktemp(f"{model}-known-answer"))
        return memo["known_answer"]

    return known_answer


@pytest.fixture(scope="session")
def agreement_references(zoo, known_answers) -> Callable[[str], AgreementSet]:
    """Each model's agreement set with its torch eager pass, run once per model handle (kept in
    its memo) and compared with by the agreement gate on every deployed backend (and by the
    probes that perturb one)."""

    def reference(model: str) -> AgreementSet:
        memo = zoo.model(model).memo
        if "agreement_set" not in memo:
            memo["agreement_set"] = AgreementSet(zoo, model, known_answers(model))
        return memo["agreement_set"]

    return reference


def item_model(item: pytest.Item) -> str | None:
    """The model an item checks: its suite's, or the ``model`` parameter of a per-model test."""
    model = _suite_model(getattr(item, "cls", None))
    if model is None:
        param = getattr(getattr(item, "callspec", None), "params", {}).get("model")
        model = param if isinstance(param, str) else None
    return model


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Once this process moves on from a model's items to another model's, the finished model's
    handle is released (Workspace.release) and freed memory is handed back to the system, so an
    xdist worker holds one model's networks, sessions and sets at a time instead of all five.
    The scheduler hands out a case's rows (and a model's agreement rows) together, so a model
    seldom comes back; when it does, its artifacts are read from the cache again."""
    yield
    model, workspace = item_model(item), item.config.stash.get(_workspace_key, None)
    if nextitem is None or model is None or workspace is None:
        return  # the last item: the process ends anyway
    following = item_model(nextitem)
    if following is not None and following != model and workspace.release(model):
        release_freed_memory()


def release_freed_memory() -> None:
    """Collect the released objects now (torch modules and sessions sit in reference cycles) and
    ask glibc to return its freed heap pages to the system, which it otherwise keeps in its arenas."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None  # not glibc (musl, macOS): the collection alone


_LIBC = _load_libc()


def _gate_item(item: pytest.Item) -> bool:
    return any(key == "zoo_cell" for key, _ in item.user_properties)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _warnings_into_row(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _warnings_into_row(item):
        yield


@contextlib.contextmanager
def _warnings_into_row(item: pytest.Item):
    """Warnings raised while a gate builds or runs (a library's division warning, a tolerated
    input) belong to that gate's row: they are recorded there (JSON report, grid) instead of
    pytest's run-wide summary. The configured filters still apply (``error::`` still raises)."""
    if not _gate_item(item):
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            texts = [f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})" for w in caught]
            if texts:
                item.user_properties.append(("zoo_warnings", list(dict.fromkeys(texts))))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Attach the artifacts this test phase built (and why) to its report, so the run summary of
    the controller lists every rebuild, whichever xdist worker did it."""
    workspace = item.config.stash.get(_workspace_key, None)
    if workspace is not None:
        reported = item.config.stash.get(_builds_reported_key, 0)
        builds = workspace.cache.rebuilds()[reported:]
        item.config.stash[_builds_reported_key] = reported + len(builds)
        if builds:
            item.user_properties.append(("zoo_builds", [
                {"artifact": f"{b.key.kind}/{b.key.model}/{b.path.name}", "reason": b.reason,
                 "seconds": round(b.seconds, 1)} for b in builds]))
    if call.excinfo is not None and call.excinfo.errisinstance(CacheError):
        item.user_properties.append(("zoo_build_error", call.when))  # a fault of the build, not a verdict
    yield


# -- parametrization -----------------------------------------------------------------------------
def _suite_model(cls) -> str | None:
    return cls.model if cls is not None and issubclass(cls, ConformanceSuite) and cls.model else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each gate (found by its ``@gate`` mark, never by the test's name) parametrizes itself."""
    model = _suite_model(metafunc.cls)
    registered = gate_of(metafunc.function)
    if model is None or registered is None or registered.parametrize is None:
        return
    spec = load_model_spec(model)
    exporters = tuple(metafunc.config.getoption("--exporter") or ()) or None
    context = GateContext(
        spec=spec, cases=planning.cases(spec, exporters=exporters), exporters=exporters,
        selected_backends=_selected_backends(metafunc.config),
        accuracy_backend=metafunc.config.getoption("--accuracy-backend"),
        accuracy_shards=accuracy_shards(metafunc.config),
        available=_available_deployed(metafunc.config),
    )
    argnames, params = registered.parametrize(context)
    metafunc.parametrize(argnames, params)
    if not params:  # nothing to check for this model (no chains, say): no row at all, not a skip
        metafunc.config.stash.setdefault(_empty_gates_key, set()).add((metafunc.cls, metafunc.function.__name__))


def nightly_tier_selected(config: pytest.Config) -> bool:
    """The slow tier runs when asked for: --nightly, or a -m expression that says anything about
    slow (``-m slow``, ``-m "not slow"``: then the expression alone decides)."""
    return bool(config.getoption("--nightly")) or re.search(r"\bslow\b", config.getoption("markexpr") or "") is not None


def _deselect_nightly_tier(config: pytest.Config, items: list[pytest.Item]) -> None:
    if nightly_tier_selected(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=slow)
        config.stash[_nightly_deselected_key] = len(slow)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    empty = config.stash.get(_empty_gates_key, set())
    items[:] = [item for item in items if (getattr(item, "cls", None), getattr(item, "originalname", None)) not in empty]
    _deselect_nightly_tier(config, items)
    for item in items:
        model = _suite_model(getattr(item, "cls", None))
        registered = gate_of(getattr(item, "function", None))
        if model is None or registered is None:
            continue
        item.add_marker(getattr(pytest.mark, model))
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params["case"] if "case" in params else params.get("chain_case")
        label = case.id if isinstance(case, (Case, ChainCase)) else params["golden"]["file"] if "golden" in params else "-"
        gate_label = registered.label
        part = params.get("accuracy_part")
        if isinstance(part, Shard):  # a shard only scores; the merge item holds the verdict
            gate_label, label = "accuracy-shard", part.label
        elif isinstance(part, str):
            label = f"merge of {parse_merge(part)} shards"
        cell = {"model": model, "gate": gate_label, "backend": registered.row_backend(params), "case": label,
                "kind": registered.kind}
        item.user_properties.append(("zoo_cell", cell))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Whether this run holds nightly-tier tests, once every deselection (-m, -k, the tier's own)
    is done: the speed gate then times the backends whose rows are nightly-only, too."""
    session.config.stash[_slow_selected_key] = bool(session.config.getoption("--nightly")) or any(
        item.get_closest_marker("slow") is not None for item in session.items)


class BackendCheck:
    """A gate row whose backend this host lacks, or the run left out, is skipped before any fixture
    runs (one that --require-backends names fails instead, when the test would run), as the ONNX
    backend test runner skips what its backend does not support; the reason travels with the row,
    so the grid can tell "not on this host" from "not selected"."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        registered = gate_of(getattr(item, "function", None))
        if registered is None or not registered.checks_backend or _suite_model(getattr(item, "cls", None)) is None:
            return
        backend = registered.row_backend(getattr(getattr(item, "callspec", None), "params", {}))
        workspace = _session_workspace(item.config)
        availability = workspace.availability(backend)
        if availability.ok:
            return
        if backend in workspace.options.required_backends:  # a failed gate, not a setup error: at call time
            item.stash[_required_missing_key] = f"{availability.describe(backend)} (required by --require-backends)"
            return
        item.user_properties.append(("zoo_unavailable", {"reason": availability.reason, "selected": availability.selected}))
        pytest.skip(availability.describe(backend))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        message = item.stash.get(_required_missing_key, None)
        if message is not None:
            pytest.fail(message, pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add the row to the conformance matrix and the artifacts built to the run's list, then (in the
    process that writes JUnit XML, before junitxml reads them) replace the structured records by
    flat ``zoo.*`` string properties. Each phase's duration counts towards the test's time in
    the durations file (longest first, next run)."""
    if _CONFIG and hasattr(_CONFIG[0], "workerinput"):
        return  # an xdist worker forwards the structured records to the controller untouched
    durations = _CONFIG[0].stash.get(_durations_key, None) if _CONFIG else None
    if durations is not None:  # a reused verdict counts what computing it took, for the next cold run
        properties = dict(report.user_properties)
        cached = properties.get("zoo_cached") or {"seconds": properties.get("zoo.cached.seconds")}
        durations.add(report.nodeid, float(cached["seconds"]) if cached["seconds"] is not None else report.duration)
    builds = [b for k, v in report.user_properties if k == "zoo_builds" for b in v]
    matrix = _current_matrix()
    if builds and matrix is not None:
        matrix.add_builds(builds)
    report.user_properties = [(k, v) for k, v in report.user_properties if k != "zoo_builds"]
    cell = dict(report.user_properties).get("zoo_cell")
    if cell is None:
        return
    results = inject(cell["backend"], [v for k, v in report.user_properties if k == "zoo_result"])
    cached = dict(report.user_properties).get("zoo_cached")
    _add_matrix_row(report, cell, results, cached)
    others = [(k, v) for k, v in report.user_properties if k not in ("zoo_cell", "zoo_result", "zoo_warnings",
                                                                        "zoo_build_error", "zoo_cached",
                                                                        "zoo_unavailable")]
    report.user_properties = others + flat_properties(cell, report.outcome, results, cached)


def _add_matrix_row(report: pytest.TestReport, cell: dict, results: list[dict], cached: dict | None) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
        report.when == "teardown" and report.outcome == "failed"
    ):
        matrix = _current_matrix()
        if matrix is None:
            return
        if report.skipped:
            detail = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            detail = detail.removeprefix("Skipped: ")
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = getattr(crash, "message", None) or report.longreprtext or "failed"
            detail = message.strip().splitlines()[0][:300]
        else:
            detail = ""
        diverging = [r["triage"]["first_divergence"] for r in results if (r.get("triage") or {}).get("first_divergence")]
        if report.failed and diverging:  # the parity failure's first diverging node, in the grid too
            first = diverging[0]
            module = f"module {first['module']!r}, " if first.get("module") else ""
            detail += f" [first diverging {module}node {first['node']!r} ({first['op_type']})]"
        unavailable = None
        for key, value in report.user_properties:
            if key == "zoo_relabel":
                cell = {**cell, **value}
            elif key == "zoo_unavailable":
                unavailable = value
        outcome = report.outcome
        if report.failed and any(k == "zoo_build_error" for k, _ in report.user_properties):
            outcome = "error"
        caught = list(dict.fromkeys(w for k, v in report.user_properties if k == "zoo_warnings" for w in v))
        matrix.add(MatrixRow(**cell, outcome=outcome, detail=detail, nodeid=report.nodeid, results=results,
                             warnings=caught, cached=cached, unavailable=unavailable))


_CONFIG: list[pytest.Config] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


def _current_matrix() -> ConformanceMatrix | None:
    return _CONFIG[0].stash.get(_matrix_key, None) if _CONFIG else None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """A required backend that ran no gate at all (nothing selected it, or every row skipped for
    another reason) fails the run: on a nightly host that is a broken night, not a quiet one."""
    config = session.config
    if hasattr(config, "workerinput") or config.option.collectonly:
        return
    matrix = config.stash.get(_matrix_key, ConformanceMatrix())
    idle = matrix.backends_without_a_gate(_required_backends(config))
    config.stash[_idle_required_key] = idle
    if idle and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    recorded = _record_history(config, matrix, int(session.exitstatus))
    if isinstance(recorded, Recorded) and recorded.comparison.regressions and config.getoption("--fail-on-regression") \
            and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _write_report(session, matrix)


def _write_report(session: pytest.Session, matrix: ConformanceMatrix) -> None:
    """This run's JSON report, whatever happened: no row at all, or an interrupted run (the rows
    of the tests that finished). The previous run's report never stays in its place."""
    config = session.config
    path = _report_path(config)
    interrupted = session.exitstatus == pytest.ExitCode.INTERRUPTED or bool(session.shouldstop)
    run = {
        "id": config.stash[_run_id_key],
        "started": _utc(config.stash[_started_key]), "finished": _utc(time.time()),
        "exit_status": int(session.exitstatus), "interrupted": interrupted,
        "tests_collected": session.testscollected,
    }
    throughput = [r["throughput"] for row in matrix.rows for r in row.results if "throughput" in r]
    try:
        matrix.write_json(path, throughput, run)
        config.stash[_report_written_key] = f"conformance report: {path}" + (
            " (interrupted: the rows of the tests that finished)" if interrupted else "")
    except OSError as exc:
        config.stash[_report_written_key] = f"conformance report NOT written: {path}: {exc.strerror or exc}"


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _record_history(config: pytest.Config, matrix: ConformanceMatrix, exit_status: int) -> "Recorded | str | None":
    """Append the run to the history (controller only) and compare it with earlier runs; a history
    that cannot be used is reported, and leaves the run's own verdicts alone."""
    path = history_path(config.getoption("--history"), Path(config.rootpath))
    if path is None or not matrix.rows:
        return None
    agreement = {}
    for model in {r.model for r in matrix.rows}:
        try:
            accuracy = load_model_spec(model).accuracy
        except Exception:  # noqa: BLE001 - a model the yaml cannot describe has no bounds to apply
            accuracy = None
        agreement[model] = dict(accuracy.agreement) if accuracy and accuracy.agreement else {}
    try:
        recorded = record_run(path, run_id=config.stash[_run_id_key], started=config.stash[_started_key],
                              exit_status=exit_status, rootpath=Path(config.rootpath),
                              threads=config.getoption("--threads"), rows=matrix.rows, builds=matrix.builds,
                              agreement=agreement)
    except HistoryError as exc:
        recorded = f"history not written: {exc}"
    config.stash[_history_key] = recorded
    if isinstance(recorded, Recorded):
        matrix.marks = recorded.comparison.marks()
    return recorded


def pytest_unconfigure(config: pytest.Config) -> None:
    set_live_sink(None)
    durations = config.stash.get(_durations_key, None)
    if durations is not None:
        try:
            durations.save()
        except OSError:
            pass  # a read-only cache: the next run orders by what it has
    fleet = config.stash.get(_fleet_key, None)
    if fleet is not None:
        fleet.close()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist load`` (what ``-n`` uses): tests handed out longest first (tooling/schedule.py)."""
    if config.getvalue("dist") != "load":
        return None
    durations = config.stash.get(_durations_key, None) or Durations(
        Roots.resolve(cache_dir=config.getoption("--cache-dir")).cache_dir)
    return LongestFirstScheduling(config, log, durations.order)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """A worker behind a proxy gateway died with its host (``popen//via=``): its gateway and the
    dead proxy leave execnet's group, whose teardown would otherwise try to kill them through the
    closed socket, raise, and lose the run's report (JUnit, grid) after the crash was recorded."""
    gateway = node.gateway
    if error is None or not gateway.spec.via:
        return
    group = getattr(gateway, "_group", None)
    proxy = next((gw for gw in group or () if gw.id == gateway.spec.via), None)
    if group is None or proxy is None or fleet_gateway_alive(proxy):
        return
    for dead in (gateway, proxy):
        if dead in group._gateways:
            group._gateways.remove(dead)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_newgateway(gateway) -> None:
    """A gateway to another host (``--tx socket=HOST:PORT``, ``ssh=HOST``, or ``popen//via=`` one)
    runs workers only where the checkout, venv, staged data and artifact cache are the
    controller's (tooling/fleet.py); a host that differs is refused before any test, by name."""
    spec = gateway.spec
    if spec.popen and not spec.via:
        return  # a worker on this host shares everything with the controller
    config = _CONFIG[0]
    fleet = config.stash.get(_fleet_key, None)
    if fleet is None:
        roots = {name: (config.getoption("--" + name.replace("_", "-")), env) for name, env in ENV.items()}
        cache_dir = Roots.resolve(cache_dir=config.getoption("--cache-dir")).cache_dir
        fleet = config.stash[_fleet_key] = Fleet(config.rootpath, roots, cache_dir, config.stash[_run_id_key])
    problems = fleet.check(gateway)
    where = f"{spec.socket or spec.ssh or spec.via}"
    if problems:
        raise pytest.UsageError(f"zoo fleet: refusing host {where}: it differs from the controller: " + "; ".join(problems))
    terminal = config.pluginmanager.getplugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"zoo fleet: host {where} matches the controller (commit "
                            f"{fleet.identity['commit'][:12]}, venv, staged data, shared cache)")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    deselected = config.stash.get(_nightly_deselected_key, 0)
    if deselected:
        terminalreporter.write_line(
            f"nightly tier: {deselected} slow tests deselected (deploy shapes, dynamo exports); add --nightly to run them"
        )
    for backend, why in config.stash.get(_idle_required_key, {}).items():
        terminalreporter.write_line(f"FAILED: required backend {backend} ran no gate: {why}", red=True, bold=True)
    matrix = config.stash.get(_matrix_key, None)
    if matrix is not None and matrix.builds:
        terminalreporter.section("artifacts built in this run")
        for line in matrix.render_builds():
            terminalreporter.write_line(line)
    if matrix and matrix.rows:
        terminalreporter.section("conformance grid")
        for line in matrix.render():
            terminalreporter.write_line(line)
    written = config.stash.get(_report_written_key, None)
    if written:
        if not (matrix and matrix.rows):
            written += " (no conformance row in this run)"
        terminalreporter.write_line(written, red="NOT written" in written)
    if matrix and matrix.rows:
        _history_summary(terminalreporter, config)


def _history_summary(terminalreporter, config: pytest.Config) -> None:
    recorded = config.stash.get(_history_key, None)
    if isinstance(recorded, str):
        terminalreporter.write_line(recorded, red=True, bold=True)
        return
    if recorded is None:
        return
    comparison = recorded.comparison
    since = comparison.since.label if comparison.since else "(no earlier run of this host class and versions)"
    terminalreporter.section(f"changes since {since}")
    for line in comparison.render():
        terminalreporter.write_line(line, red=line.lstrip().startswith("REGRESSION"))
    if comparison.changes:
        terminalreporter.write_line(comparison.LEGEND)
    session = f", a pass of session {recorded.session_id}" if recorded.session_id else ""
    terminalreporter.write_line(f"history: {recorded.path} ({recorded.runs_stored} runs; this one {recorded.run_label}"
                                f"{session}, compared and written in {recorded.seconds:.2f} s)")
