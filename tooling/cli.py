"""Command line: ``python -m tooling verify-golden`` and ``python -m tooling stage --check``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tooling.compare import compare_outputs
from tooling.locations import Roots, staged_inventory
from tooling.model_spec import ModelSpecError, load_model_spec, model_names
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
        with np.load(path) as data:
            missing = [n for n in net.input_names + net.output_names if n not in data.files]
            if missing:
                print(f"{path}: lacks arrays {missing} (has {data.files})", file=sys.stderr)
                return 2
            feeds = {n: data[n] for n in net.input_names}
            expected = {n: data[n] for n in net.output_names}
    except (OSError, ValueError) as exc:
        print(f"{path}: not a readable npz file ({exc})", file=sys.stderr)
        return 2
    roots = Roots(None, None, None, Roots.resolve(cache_dir=args.cache_dir).cache_dir)
    handle = Workspace(roots, Options(weights="seeded", salt=args.salt)).model(args.model)
    weights = WeightsChoice(None, args.salt)
    if args.backend == "torch":
        from tooling.backends.cpu import TorchSession

        module, _ = handle.network(args.network, None, weights)
        actual = TorchSession(module, net.input_names, net.output_names).run(feeds)
    else:
        case = handle.case_for_feeds(args.network, feeds, args.backend)
        actual = handle.session(args.backend, case, weights).run(feeds)
    stats = compare_outputs(actual, expected, {o: spec.tolerance(args.network, o, args.backend) for o in net.outputs})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    golden = sub.add_parser("verify-golden", help="run the port on a golden file's inputs and compare its outputs")
    golden.add_argument("model")
    golden.add_argument("network")
    golden.add_argument("file", help="npz holding arrays named as the network's ONNX inputs and outputs")
    golden.add_argument("--salt", default="public", help="salt of the seeded weights the golden was made with")
    golden.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnxruntime", "openvino"])
    golden.add_argument("--cache-dir", help="artifact cache for ONNX backends (default: ZOO_CACHE_DIR or .zoo-cache)")
    golden.set_defaults(run=verify_golden)

    stage = sub.add_parser("stage", help="what is staged for each model, and where it is expected")
    stage.add_argument("--check", action="store_true", required=True)
    stage.add_argument("--data-root")
    stage.add_argument("--weights-root")
    stage.add_argument("--upstream-root")
    stage.add_argument("models", nargs="*", help="default: every model with a baseline")
    stage.set_defaults(run=stage_check)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ModelSpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
