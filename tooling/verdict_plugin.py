"""pytest side of the verdict cache: a gate whose key (``tooling/verdict_key.py``) has a stored
pass is reported again, labelled cached, instead of recomputed.

The decision is taken in ``pytest_pyfunc_call``, after the gate's fixtures are set up (they are
cheap handles: the ``zoo`` workspace and the known-answer factory build nothing until a gate asks)
and before its body runs: a hit attaches the stored figures and provenance to the row and skips
the body, so no network, artifact or session is built. A computed row is stored once its setup,
call and teardown all passed; failures, errors, skips and expected failures never are.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tooling.gates import gate_of
from tooling.locations import Roots
from tooling.verdict_cache import DamagedEntry, VerdictCache
from tooling.verdict_key import GateInstance, VerdictKey, forget, slice_test_key, verdict_key

SLICE_TESTS = "tests/models"  # the slices' own tests, below the model test modules
CACHED = "zoo_cached"  # user property of a replayed row: its provenance
NOTE = "zoo.verdict_note"  # user property: why a stored verdict was not reused
_pending = pytest.StashKey[tuple]()
_phases = pytest.StashKey[dict]()
_notes = pytest.StashKey[list]()
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def max_age_s(raw: str) -> float:
    match = _DURATION.match(raw)
    if match is None:
        raise pytest.UsageError(f"--verdict-cache-max-age {raw!r}: give seconds, or a number with s, m, h or d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zoo")
    group.addoption("--no-verdict-cache", action="store_true",
                    help="recompute every gate and store nothing (default: reuse passes whose inputs did not change)")
    group.addoption("--verdict-cache-max-age", default="24h",
                    help="oldest cached speed verdict (throughput, cpu-speedup) to reuse: seconds or 90m, 12h, 7d "
                    "(default 24h); parity and accuracy verdicts depend only on their key")


def pytest_configure(config: pytest.Config) -> None:
    max_age_s(config.getoption("--verdict-cache-max-age"))  # a usage error now, not in the first gate
    config.stash[_notes] = []


def _mode(config: pytest.Config) -> str:
    """off: neither read nor write; refresh: recompute and store; reuse: the default."""
    if config.getoption("--no-verdict-cache"):
        return "off"
    if config.getoption("--nightly") or config.getoption("--rebuild"):
        return "refresh"
    return "reuse"


def _test_files(item: pytest.Item) -> tuple[Path, ...]:
    """The test module, the conftest files above it and the pytest config: code a row runs too."""
    root = Path(item.config.rootpath)
    files = [Path(item.path)] + [d / "conftest.py" for d in Path(item.path).parents
                                 if d == root or d.is_relative_to(root)]
    if item.config.inipath:
        files.append(Path(item.config.inipath))
    return tuple(f for f in files if f.is_file())


def _key(item: pytest.Function) -> tuple[str, VerdictKey] | None:
    """(where its entry lives, its key) for a gate row or a slice's own test; None: not cached."""
    params = dict(getattr(getattr(item, "callspec", None), "params", {}))
    cell = dict(item.user_properties).get("zoo_cell")
    registered = gate_of(getattr(item, "function", None))
    if cell is not None and registered is not None:
        workspace = item.funcargs.get("zoo")
        if workspace is None:
            return None
        instance = GateInstance(cell["model"], registered.label, params, item.nodeid, _test_files(item))
        return cell["model"], verdict_key(instance, workspace)
    if not Path(item.path).is_relative_to(Path(item.config.rootpath) / SLICE_TESTS):
        return None
    workspace = item.funcargs.get("zoo") or _session_workspace(item.config)
    roots = workspace.roots
    if roots.data_root or roots.weights_root or roots.upstream_root:
        return None  # staged inputs are not hashed for these: they always run
    return "slice-tests", slice_test_key(item.nodeid, params, _test_files(item), workspace, _models_of(item))


def _models_of(item: pytest.Item) -> tuple[str, ...]:
    """The models a test below tests/models/ is for: its model directory and its model markers
    (none found: the test is keyed by every engine file)."""
    from tooling.baseline import model_names

    known = set(model_names())
    relative = Path(item.path).relative_to(Path(item.config.rootpath) / SLICE_TESTS).parts
    named = {relative[0]} if len(relative) > 1 else set()
    named |= {mark.name for mark in item.iter_markers()}
    return tuple(sorted(named & known))


def _session_workspace(config: pytest.Config):
    from tooling.pytest_plugin import _workspace, _workspace_key

    if _workspace_key not in config.stash:
        config.stash[_workspace_key] = _workspace(config)
    return config.stash[_workspace_key]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    config = pyfuncitem.config
    if _mode(config) == "off":
        return None
    benchmark = pyfuncitem.funcargs.get("benchmark")
    if benchmark is not None and benchmark.disabled:
        return None  # the timed gate skips here (xdist pass): nothing to reuse or store
    try:
        found = _key(pyfuncitem)
    except Exception as exc:  # noqa: BLE001 - without a key the test simply runs
        _note(pyfuncitem, f"no verdict key ({type(exc).__name__}: {exc}); computed")
        return None
    if found is None:
        return None
    model, key = found
    mode = _mode(config)
    cache = VerdictCache(Roots.resolve(cache_dir=config.getoption("--cache-dir")).cache_dir)
    pyfuncitem.stash[_pending] = (model, key, cache, time.perf_counter())
    if mode != "reuse":
        return None
    try:
        stored = cache.load(model, key)
    except DamagedEntry as exc:
        _note(pyfuncitem, f"damaged cache entry, recomputed: {exc}")
        return None
    if stored is None:
        return None
    limit = max_age_s(config.getoption("--verdict-cache-max-age"))
    if key.timed and stored.age_s() > limit:
        _note(pyfuncitem, f"cached speed verdict is {stored.age_s() / 3600:.1f} h old (--verdict-cache-max-age "
                          f"{config.getoption('--verdict-cache-max-age')}), recomputed")
        return None
    pyfuncitem.stash[_pending] = ()  # reused: nothing to store
    pyfuncitem.user_properties.extend(("zoo_result", r) for r in stored.results)
    pyfuncitem.user_properties.extend(("zoo_relabel", r) for r in stored.relabels)
    pyfuncitem.user_properties.append((CACHED, {**stored.provenance(), "key": key.digest}))
    return True


def _note(item: pytest.Item, message: str) -> None:
    item.user_properties.append((NOTE, message))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    phases = item.stash.setdefault(_phases, {})
    phases[report.when] = report.passed and not hasattr(report, "wasxfail")
    pending = item.stash.get(_pending, ())
    if report.when == "teardown" and pending:
        model, key, cache, started = pending
        item.stash[_pending] = ()
        if all(phases.get(w) for w in ("setup", "call", "teardown")):
            _store(item, model, key, cache, time.perf_counter() - started)
    return report


def _store(item: pytest.Item, model: str, key: VerdictKey, cache: VerdictCache, seconds: float) -> None:
    results = [v for k, v in item.user_properties if k == "zoo_result"]
    relabels = [v for k, v in item.user_properties if k == "zoo_relabel"]
    try:
        cache.store(model, key, nodeid=item.nodeid, results=results, relabels=relabels,
                    run=_run_id(item.config), seconds=seconds)
    except (OSError, TypeError, ValueError) as exc:
        _note(item, f"verdict not stored ({type(exc).__name__}: {exc})")


def _run_id(config: pytest.Config) -> str:
    from tooling.pytest_plugin import _run_id_key

    return config.stash.get(_run_id_key, "unknown")


def is_cached(report: pytest.TestReport) -> bool:
    """Whether ``report`` replays a stored verdict (structured, or flattened for JUnit)."""
    return any(k == CACHED or (k == "zoo.verdict" and v == "cached") for k, v in report.user_properties)


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    if report.when == "call" and report.passed and is_cached(report):
        return "cached", "c", "CACHED"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the notes for the summary; a reused slice test (no grid row, whose properties the
    conformance plugin flattens) gets the flat JUnit properties here, before junitxml reads them."""
    config = _config[0] if _config else None
    if config is None or hasattr(config, "workerinput"):
        return
    properties = dict(report.user_properties)
    if CACHED in properties and "zoo_cell" not in properties:
        report.user_properties = [(k, v) for k, v in report.user_properties if k != CACHED] + [
            ("zoo.verdict", "cached")] + [(f"zoo.cached.{k}", str(v)) for k, v in properties[CACHED].items()]
    for key, value in report.user_properties:
        if key == NOTE:
            config.stash[_notes].append(f"{report.nodeid}: {value}")


_config: list[pytest.Config] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _config[:] = [session.config]
    forget()  # digests memoised by an earlier session in this process (an in-process run) are stale


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    cached = len(terminalreporter.stats.get("cached", []))
    notes = config.stash.get(_notes, [])
    mode = _mode(config)
    if not cached and not notes and mode == "reuse":
        return
    terminalreporter.section("verdict cache")
    what = {"off": "off (--no-verdict-cache): every gate computed, nothing stored",
            "refresh": "refresh (--nightly or --rebuild): every gate computed, passes stored",
            "reuse": f"{cached} verdict(s) reused, labelled cached (their run and commit: JSON report, JUnit zoo.cached.*)"}
    terminalreporter.write_line(what[mode])
    for line in notes:
        terminalreporter.write_line(f"  {line}")
