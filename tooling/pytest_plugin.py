"""pytest integration: options, the ``zoo`` fixture, gate parametrization and the conformance matrix."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tooling.backends import BACKENDS, worker_device
from tooling.conformance import ConformanceSuite
from tooling.gates import GateContext, gate_of
from tooling.locations import Roots
from tooling.model_spec import EXPORTERS, Case, load_model_spec
from tooling.report import ConformanceMatrix, MatrixRow
from tooling.workspace import Options, Workspace

MODEL_MARKERS = ("videopose3d", "transpose", "dekr", "gma", "fomm")
_matrix_key = pytest.StashKey[ConformanceMatrix]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zoo", "zoo-conformance")
    group.addoption("--data-root", help="staged datasets (env ZOO_DATA_ROOT)")
    group.addoption("--weights-root", help="staged checkpoints, <root>/<model>/<file> (env ZOO_WEIGHTS_ROOT)")
    group.addoption("--upstream-root", help="upstream clones <root>/<model> or mirrors <root>/<model>.git (env ZOO_UPSTREAM_ROOT)")
    group.addoption("--cache-dir", help="artifact cache (env ZOO_CACHE_DIR, default .zoo-cache/)")
    group.addoption("--rebuild", action="store_true", help="rebuild every artifact this run touches")
    group.addoption("--exporter", action="append", choices=EXPORTERS, help="restrict to these exporters (repeatable)")
    group.addoption("--backends", help="comma-separated deployed backends to run (default: all available)")
    group.addoption("--threads", type=int, default=1, help="threads per backend session and for torch (default 1)")
    group.addoption("--weights", choices=("auto", "seeded"), default="auto",
                    help="auto: staged checkpoint when present, else seeded; seeded: always seeded")
    group.addoption("--salt", default="public", help="salt of the seeded weights")
    group.addoption("--device", help="NPU or GPU id for device backends")
    group.addoption("--devices", help="NPU or GPU ids, comma-separated: xdist worker gwN uses id N modulo their count "
                    "(run with -n <count> for one worker per device)")
    group.addoption("--accuracy-limit", type=int, help="score only the first N samples (a quick look, not gated)")
    group.addoption("--accuracy-backend", help="backend for the dataset accuracy gate (default: every deployed one)")
    group.addoption("--restart-accuracy", action="store_true", help="discard resumable accuracy results")
    group.addoption("--zoo-report", default="reports/conformance.json", help="JSON conformance report path")


def _selected_backends(config: pytest.Config) -> tuple[str, ...] | None:
    chosen = config.getoption("--backends")
    return tuple(b.strip() for b in chosen.split(",")) if chosen else None


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
    unknown = [b for b in backends or () if b not in BACKENDS]
    if unknown:
        raise pytest.UsageError(f"--backends: unknown {unknown}; known: {sorted(BACKENDS)}")
    options = Options(
        threads=opt("--threads"), rebuild=opt("--rebuild"),
        exporters=tuple(opt("--exporter")) if opt("--exporter") else None, backends=backends,
        weights=opt("--weights"), salt=opt("--salt"), device=device,
        accuracy_limit=opt("--accuracy-limit"), restart_accuracy=opt("--restart-accuracy"),
    )
    return Workspace(roots, options)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_matrix_key] = ConformanceMatrix()
    torch.set_num_threads(max(1, config.getoption("--threads")))


@pytest.fixture(scope="session")
def zoo(pytestconfig) -> Workspace:
    return _workspace(pytestconfig)


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
        spec=spec, cases=spec.cases(exporters=exporters), exporters=exporters,
        selected_backends=_selected_backends(metafunc.config),
        accuracy_backend=metafunc.config.getoption("--accuracy-backend"),
    )
    argnames, params = registered.parametrize(context)
    metafunc.parametrize(argnames, params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        model = _suite_model(getattr(item, "cls", None))
        registered = gate_of(getattr(item, "function", None))
        if model is None or registered is None:
            continue
        item.add_marker(getattr(pytest.mark, model))
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("case")
        backend = params.get(registered.backend_arg) if registered.backend_arg else None
        golden = params.get("golden")
        # An empty parameter set (say, a model without goldens) leaves pytest's NOTSET marker here.
        label = case.id if isinstance(case, Case) else golden["file"] if isinstance(golden, dict) else "-"
        cell = {"model": model, "gate": registered.label, "backend": backend or registered.default_backend, "case": label}
        item.user_properties.append(("zoo_cell", cell))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
        report.when == "teardown" and report.outcome == "failed"
    ):
        props = dict(report.user_properties)
        cell = props.get("zoo_cell")
        if cell is None:
            return
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
        results = [v for k, v in report.user_properties if k == "zoo_result"]
        matrix.add(MatrixRow(**cell, outcome=report.outcome, detail=detail, nodeid=report.nodeid, results=results))


_CONFIG: list[pytest.Config] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


def _current_matrix() -> ConformanceMatrix | None:
    return _CONFIG[0].stash.get(_matrix_key, None) if _CONFIG else None


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    matrix = config.stash.get(_matrix_key, None)
    if not matrix or not matrix.rows:
        return
    terminalreporter.section("conformance matrix")
    for line in matrix.render():
        terminalreporter.write_line(line)
    throughput = [r for row in matrix.rows for r in row.results if "throughput" in r]
    path = Path(config.getoption("--zoo-report"))
    if not path.is_absolute():
        path = Path(config.rootpath) / path
    matrix.write_json(path, [t["throughput"] for t in throughput])
    terminalreporter.write_line(f"conformance report: {path}")
