"""Command line: ``python -m tooling verify-golden``, ``stage --check``, ``triage``, ``doctor``, ``history merge``
and ``report``."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tooling import planning
from tooling.arrays import ArrayFileError, read_arrays
from tooling.baseline import load_model_spec, model_names
from tooling.compare import compare_outputs
from tooling.doctor import doctor as host_doctor
from tooling.jsonio import write_json
from tooling.locations import Roots, staged_inventory
from tooling.model_spec import ModelSpecError
from tooling.triage import TriageUnsupported, triage_case
from tooling.weights import WeightsChoice
from tooling.workspace import Options, Workspace


def verify_golden(args: argparse.Namespace) -> int:
    spec = load_model_spec(args.model)
    if args.network not in spec.networks:
        print(f"{args.model} has no network {args.network!r}; networks: {', '.join(spec.networks)}", file=sys.stderr)
        return 2
    net = spec.networks[args.network]
    path = Path(args.file)
    try:
        arrays = read_arrays(path)
        try:  # a slice may rebuild inputs a golden stores only as a recipe
            feeds = spec.load_slice().golden_inputs(spec, args.network, path, arrays)
            missing = []
        except KeyError:
            feeds, missing = {}, [n for n in net.input_names if n not in arrays]
        missing += [n for n in net.output_names if n not in arrays]
        if missing:
            raise ArrayFileError(f"{path}: lacks arrays {missing} (has {sorted(arrays)})")
    except (ArrayFileError, ValueError) as exc:  # a slice's recipe check names the file too
        print(str(exc), file=sys.stderr)
        return 2
    expected = {n: arrays[n] for n in net.output_names}
    roots = Roots(None, None, None, Roots.resolve(cache_dir=args.cache_dir).cache_dir)
    handle = Workspace(roots, Options(weights="seeded", salt=args.salt)).model(args.model)
    weights = WeightsChoice(None, args.salt)
    # The yaml names the variant a golden was made with (e.g. upstream's unpatched behaviour).
    variant = args.variant or next((g.get("variant") for g in net.goldens if g.get("file") == path.name), None)
    if variant is not None and variant not in {v.name for v in net.variants}:
        print(f"{args.model}/{args.network} has no variant {variant!r}; variants: "
              f"{', '.join(v.name for v in net.variants)}", file=sys.stderr)
        return 2
    if args.backend == "torch":
        from tooling.backends.cpu import TorchSession

        module, _ = handle.network(args.network, variant, weights)
        actual = TorchSession(module, net.input_names, net.output_names).run(feeds)
    else:
        case = handle.case_for_feeds(args.network, feeds, args.backend)
        if variant is not None:
            case = replace(case, variant=variant)
        actual = handle.session(args.backend, case, weights).run(feeds)
    stats = compare_outputs(actual, expected, planning.tolerances(spec, args.network, args.backend))
    for s in stats:
        print(s.line())
    return 0 if all(s.passed for s in stats) else 1


def stage_check(args: argparse.Namespace) -> int:
    roots = Roots.resolve(data_root=args.data_root, weights_root=args.weights_root, upstream_root=args.upstream_root)
    names = args.models or model_names()
    all_found = True
    print(f"data root:     {roots.data_root or 'unset (--data-root / ZOO_DATA_ROOT)'}")
    print(f"weights root:  {roots.weights_root or 'unset (--weights-root / ZOO_WEIGHTS_ROOT)'}")
    print(f"upstream root: {roots.upstream_root or 'unset (--upstream-root / ZOO_UPSTREAM_ROOT)'}")
    print(f"cache dir:     {roots.cache_dir}")
    for name in names:
        spec = load_model_spec(name)
        print(f"\n{name}: {spec.title}")
        for item in staged_inventory(spec, roots):
            mark = "found  " if item.found else "MISSING"
            all_found &= item.found or not item.required
            print(f"  {mark} {item.kind:<10} {item.what:<40} {item.expected}")
    return 0 if all_found else 1


def triage(args: argparse.Namespace) -> int:
    """Name the first graph node whose output differs between the backend and ONNX Runtime without
    graph rewrites (for ``--backend onnx``: the first torch module whose exported output differs
    from torch eager), on the case's example inputs: exit 1 if one does, 0 if none."""
    spec = load_model_spec(args.model)
    cases = {c.id: c for c in planning.cases(spec)}
    if args.case not in cases:
        print(f"{args.model} has no case {args.case!r}; cases: {', '.join(cases)}", file=sys.stderr)
        return 2
    roots = Roots.resolve(weights_root=args.weights_root, cache_dir=args.cache_dir)
    handle = Workspace(roots, Options(weights=args.weights, salt=args.salt)).model(args.model)
    availability = handle.ws.availability(args.backend)
    if not availability.ok:
        print(availability.describe(args.backend), file=sys.stderr)
        return 2
    try:
        report = triage_case(handle, cases[args.case], args.backend)
    except TriageUnsupported as exc:
        print(f"triage not supported: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        write_json(args.json, report.as_dict())
    return 0 if report.first is None else 1


def history_merge(args: argparse.Namespace) -> int:
    from tooling.history.store import History, HistoryError

    try:
        with History(args.into) as target:
            for source in args.sources:
                with History(source, create=False) as other:
                    added, present = target.merge_from(other)
                print(f"{source}: {added} run(s) added, {present} already in {args.into}")
            print(f"{args.into}: {target.count_runs()} run(s)")
    except HistoryError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def report(args: argparse.Namespace) -> int:
    from tooling.history.session import history_path
    from tooling.history.store import HistoryError
    from tooling.htmlreport.render import render
    from tooling.model_spec import PROJECT_ROOT

    path = history_path(args.history, PROJECT_ROOT)
    if path is None:
        print("no history to render (--history none)", file=sys.stderr)
        return 2
    try:
        rendered = render(path, Path(args.out), runs=args.runs)
    except HistoryError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{rendered.html} ({rendered.runs} runs, {rendered.images} images embedded; opens offline)")
    print(f"{rendered.markdown} (for a CI job summary: cat it into $GITHUB_STEP_SUMMARY)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    golden = sub.add_parser("verify-golden", help="run the port on a golden file's inputs and compare its outputs")
    golden.add_argument("model")
    golden.add_argument("network")
    golden.add_argument("file", help="npz holding arrays named as the network's ONNX inputs and outputs")
    golden.add_argument("--salt", default="public", help="salt of the seeded weights the golden was made with")
    golden.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnxruntime", "openvino"])
    golden.add_argument("--variant", help="export variant of the network (default: the one the yaml names for "
                        "this golden file, else the network's first)")
    golden.add_argument("--cache-dir", help="artifact cache for ONNX backends (default: ZOO_CACHE_DIR or .zoo-cache)")
    golden.set_defaults(run=verify_golden)

    stage = sub.add_parser("stage", help="what is staged for each model, and where it is expected")
    stage.add_argument("--check", action="store_true", required=True)
    stage.add_argument("--data-root")
    stage.add_argument("--weights-root")
    stage.add_argument("--upstream-root")
    stage.add_argument("models", nargs="*", help="default: every model with a baseline")
    stage.set_defaults(run=stage_check)

    triage_cmd = sub.add_parser(
        "triage", help="first graph node where a deployed backend diverges from ONNX (--backend onnx: "
                       "first torch module whose ONNX export diverges from torch eager)")
    triage_cmd.add_argument("model")
    triage_cmd.add_argument("case", help="a case id as the tests name it, e.g. vp3d-smoke-b2-torchscript")
    triage_cmd.add_argument("--backend", required=True,
                            help="the deployed backend whose parity gate failed, or onnx for onnx-vs-torch")
    triage_cmd.add_argument("--weights", choices=["auto", "seeded"], default="auto",
                            help="auto: a staged checkpoint if present (as the gates do), else seeded")
    triage_cmd.add_argument("--salt", default="public", help="salt of seeded weights")
    triage_cmd.add_argument("--weights-root")
    triage_cmd.add_argument("--cache-dir", help="artifact cache (default: ZOO_CACHE_DIR or .zoo-cache)")
    triage_cmd.add_argument("--json", help="also write the report as JSON to this file")
    triage_cmd.set_defaults(run=triage)

    check_host = sub.add_parser("doctor", help="check this NPU host: atc, ais_bench, aclruntime, npu-smi, the [npu] extra")
    check_host.set_defaults(run=lambda _args: host_doctor())

    history = sub.add_parser("history", help="the run history (SQLite) the plugin appends every run to")
    history_sub = history.add_subparsers(dest="action", required=True)
    merge = history_sub.add_parser("merge", help="copy the runs of other hosts' histories into one, each run once")
    merge.add_argument("into", help="the history to merge into (created when absent)")
    merge.add_argument("sources", nargs="+", help="histories to read runs from (left unchanged)")
    merge.set_defaults(run=history_merge)

    report_cmd = sub.add_parser("report", help="render the run history as a self-contained HTML page and a markdown summary")
    report_cmd.add_argument("--history", help="history file (default: ZOO_HISTORY or reports/history.sqlite)")
    report_cmd.add_argument("--out", default="reports/report", help="folder for report.html and summary.md")
    report_cmd.add_argument("--runs", type=int, default=30, help="how many runs of the last run's host class to plot")
    report_cmd.set_defaults(run=report)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ModelSpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
