"""The dataset accuracy pass: a model's slice scores staged (or generated) data with each network
run on one backend, resumably, its records keyed by what the score depends on."""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from tooling import planning
from tooling.backends import BACKENDS
from tooling.backends.cpu import TorchSession
from tooling.cache import CacheNotWritable, denied, hold_lock
from tooling.fingerprint import content_digest
from tooling.jsonio import write_json
from tooling.locations import Roots, data_paths, find_checkpoint, missing_accuracy_inputs
from tooling.progress import SAMPLE_FIGURES, ProgressReporter, ResultStore, owned_run, run_lock, say
from tooling.shards import DONE, Shard, ids_digest, merge_id, parse_merge, read_shard, split, write_done
from tooling.slice import AccuracyContext, score_samples, splits_its_pass
from tooling.weights import WeightsChoice
from tooling.workspace import ModelHandle

# The reference pipeline a deployed pass is compared with (``--accuracy-backend torch`` scores it).
REFERENCE_BACKEND = "torch"
# Engine code a score depends on besides what its artifacts do (and what it imports).
SCORING_CODE = ("tooling.progress",)

CallObserver = Callable[[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None]


class AccuracyInputsMissing(RuntimeError):
    """The dataset or checkpoints for an accuracy pass are not staged; the message lists the paths."""


def run_accuracy(handle: ModelHandle, backend_name: str, *, roots: Roots | None = None, profile: str | None = None,
                 limit: int | None = None, label: str | None = None,
                 oracles: Mapping[str, Any] | None = None, run_dir: Path | None = None,
                 seeded: bool = False, observe: CallObserver | None = None,
                 shards: int = 1, shard: Shard | None = None) -> dict[str, float]:
    """Score the staged dataset on ``backend_name`` with the staged checkpoints.

    ``oracles`` replaces the named networks by stand-ins (known-answer runs only); ``run_dir``
    holds the resumable records (default: a directory per input fingerprint in the cache);
    ``seeded`` runs every network on seeded weights instead of checkpoints; ``observe`` sees
    each network call's feeds and outputs (the agreement gate re-runs them on torch).
    ``shard`` scores one part of a sharded pass (what it returns is a count, not a figure);
    ``shards`` > 1 merges that many parts into the pass's figures (tooling/shards.py), scoring
    here any part no other process has started and waiting for those running elsewhere.
    """
    roots = roots or handle.ws.roots
    weights, paths, dims = _pass_inputs(handle, roots, profile, seeded)
    oracles = dict(oracles or {})
    # The backend's own bounds (om@force_fp16, say) decide whether an output may hold NaN or Inf.
    tolerances = {n: planning.tolerances(handle.spec, n, backend_name) for n in handle.spec.networks}

    def run(network: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if network in oracles:
            return oracles[network](feeds)
        case = handle.case_for_feeds(network, feeds, backend_name)
        outputs = handle.session(backend_name, case, weights[network]).run(feeds)
        for name, value in outputs.items():
            bad = int(np.count_nonzero(~np.isfinite(value))) if np.issubdtype(value.dtype, np.floating) else 0
            if bad and not tolerances[network][name].allow_nonfinite:
                raise FloatingPointError(
                    f"{handle.spec.name}/{network} on {backend_name}: output {name} holds {bad} NaN/Inf values "
                    f"(inputs {sorted(feeds)}); a score computed from them would be meaningless"
                )
        if observe is not None:
            observe(network, feeds, outputs)
        return outputs

    fingerprint = _fingerprint(handle, backend_name, weights, paths, dims, oracles)
    run_dir = run_dir or _pass_dir(handle, fingerprint)
    label = label or f"{handle.spec.name} accuracy on {backend_name}"

    def run_host(network: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if network in oracles:
            return oracles[network](feeds)
        net = handle.spec.networks[network]
        return TorchSession(handle.network(network, None, weights[network])[0], net.input_names, net.output_names).run(feeds)

    def context(folder: Path, store: Any, progress: Callable[[int, int, str], None]) -> AccuracyContext:
        return AccuracyContext(
            spec=handle.spec, data_paths=paths, run=run, progress=progress, results=store,
            host_network=lambda name: handle.network(name, None, weights[name])[0],
            limit=limit, scratch=folder, dims=dims, run_host=run_host,
        )

    def scoring(folder: Path, store_fingerprint: dict, restart: bool) -> tuple[ResultStore, AccuracyContext]:
        store = writable(folder, lambda: ResultStore(folder / "records", store_fingerprint, restart=restart))
        reporter = ProgressReporter(label, logfile=folder / "progress.txt", fresh=lambda: store.computed)
        return store, context(folder, store, reporter)

    if shard is None and shards == 1:
        with contextlib.ExitStack() as stack:
            folder = writable(run_dir, lambda: stack.enter_context(owned_run(run_dir, f"score {label}")))
            _, ctx = scoring(folder, fingerprint, handle.ws.options.restart_accuracy)
            say(f"{label}: records in {folder}")
            metrics = handle.slice.evaluate(ctx)
            write_json(folder / metrics_file(limit), metrics)
            write_json(folder / SAMPLE_FIGURES, ctx.sample_figures)
        handle.last_run_dir = folder  # where the gate finds the per-sample figures of this pass
        return metrics
    return _sharded_pass(handle, run_dir, fingerprint, label, shard or shards, limit, context, scoring)


def writable(folder: Path, make: Callable[[], Any]) -> Any:
    """``make()``, where a cache that may not be written says so, naming the run folder."""
    try:
        return make()
    except OSError as exc:
        if not denied(exc):
            raise
        raise CacheNotWritable(f"{folder}: cannot keep the resumable records of this accuracy pass "
                               f"({exc.strerror}); use a writable --cache-dir") from None


def _sharded_pass(handle: ModelHandle, run_dir: Path, fingerprint: dict, label: str, part: Shard | int,
                  limit: int | None, context: Callable[..., AccuracyContext], scoring: Callable) -> dict[str, float]:
    """Score one shard (``part`` a Shard) or merge ``part`` shards (an int) of the pass. Each
    shard scores into its own folder under the run's, held by one process at a time (a merge
    waits for a shard another process is scoring, and takes a dead host's over after its lease
    times out). A quick look on the first ``limit`` samples splits those: its shards and merge
    are kept apart from the full pass's."""
    model_slice = handle.slice
    if not splits_its_pass(model_slice):
        raise TypeError(f"{handle.spec.name}: its slice scores the pass whole (evaluate only), so it cannot be sharded")
    count = part.count if isinstance(part, Shard) else part
    samples = model_slice.accuracy_samples(context(run_dir, None, lambda *_: None))
    parts = split(samples, count)
    shards_dir = shards_folder(run_dir, limit)

    def score(which: Shard, restart: bool) -> None:
        folder = shards_dir / which.id
        mine = parts[which.index - 1]
        with contextlib.ExitStack() as stack:
            def hold() -> None:
                folder.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(hold_lock(run_lock(folder), f"score {which.label} of {label}"))

            writable(folder, hold)
            if restart:
                (folder / DONE).unlink(missing_ok=True)
            if (folder / DONE).is_file():
                return  # scored already (by its own item, or by a merge that got there first)
            store, ctx = scoring(folder, {**fingerprint, "shard": which.id, "samples": ids_digest(mine)}, restart)
            score_samples(model_slice, ctx, mine)
            write_done(folder, which, mine, {s.id: store.record_path(s.id) for s in mine})

    if isinstance(part, Shard):
        score(part, handle.ws.options.restart_accuracy)
        mine = parts[part.index - 1]
        return {"samples": float(len(mine)), model_slice.accuracy_unit: float(sum(s.units for s in mine))}
    records = []
    for index in range(1, count + 1):
        which = Shard(index, count)
        if not (shards_dir / which.id / DONE).is_file():
            print(f"zoo: {label}: {which.label} not finished when its merge started: scoring (or waiting for) "
                  "it here", file=sys.stderr, flush=True)
            score(which, restart=False)
        records += read_shard(shards_dir / which.id, which, parts[index - 1], label)
    with contextlib.ExitStack() as stack:
        merge_dir = shards_dir / merge_id(count)
        folder = writable(merge_dir, lambda: stack.enter_context(owned_run(merge_dir, f"merge {label}")))
        ctx = context(folder, None, lambda *_: None)
        metrics = model_slice.merge_records(ctx, samples, records)
        write_json(folder / metrics_file(limit), metrics)
        write_json(folder / SAMPLE_FIGURES, {s.id: model_slice.sample_figures(r) for s, r in zip(samples, records)})
    handle.last_run_dir = folder
    return metrics


def stored_metrics(handle: ModelHandle, backend_name: str, *, limit: int | None = None) -> dict[str, float] | None:
    """The metrics a finished pass on ``backend_name`` left in the cache for the same staged data,
    checkpoints, profile and limit (what the other backends' rows compare with), whether it ran
    whole or sharded (any shard count: a merge gives the unsharded figures), or None."""
    try:
        weights, paths, dims = _pass_inputs(handle, handle.ws.roots, None, False)
    except AccuracyInputsMissing:
        return None
    run_dir = _pass_dir(handle, _fingerprint(handle, backend_name, weights, paths, dims, {}))
    shards_dir = shards_folder(run_dir, limit)
    merges = sorted(p for p in shards_dir.iterdir() if parse_merge(p.name) is not None) if shards_dir.is_dir() else []
    for path in [run_dir / metrics_file(limit), *(m / metrics_file(limit) for m in merges)]:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def gated_metrics(handle: ModelHandle) -> list[str]:
    """The metrics a pass is judged by: the target's, the extra targets' and the agreement bounds'."""
    accuracy = handle.spec.accuracy
    return list(dict.fromkeys([accuracy.metric, *accuracy.extra_targets, *accuracy.agreement]))


def moves_against_reference(handle: ModelHandle, backend_name: str, metrics: Mapping[str, float],
                            limit: int | None = None) -> dict[str, Any]:
    """How a deployed pass moved each gated metric from the torch eager reference's pass over the
    same staged set (its stored figures and the signed moves), or, for the reference pass itself,
    the moves of every deployed pass already stored; empty when there is nothing to compare."""
    names = gated_metrics(handle)
    if backend_name == REFERENCE_BACKEND:
        moved = {}
        for name, backend in BACKENDS.items():
            stored = stored_metrics(handle, name, limit=limit) if backend.deployed else None
            if stored is not None:
                moved[name] = {m: stored[m] - metrics[m] for m in names if m in stored and m in metrics}
        return {"deployed_moves": moved} if moved else {}
    reference = stored_metrics(handle, REFERENCE_BACKEND, limit=limit)
    if reference is None:
        return {}
    return {"reference_metrics": reference,
            "moves_vs_reference": {m: metrics[m] - reference[m] for m in names if m in reference and m in metrics}}


def metrics_file(limit: int | None) -> str:
    """Where a pass keeps its figures: a quick look on the first N samples is not the full pass's."""
    return "metrics.json" if limit is None else f"metrics-first-{limit}.json"


def shards_folder(run_dir: Path, limit: int | None) -> Path:
    """Where a sharded pass keeps its shards and merges: a quick look splits other samples."""
    return run_dir / ("shards" if limit is None else f"shards-first-{limit}")


def _pass_inputs(handle: ModelHandle, roots: Roots, profile: str | None, seeded: bool):
    """(weights per network, staged data paths, dims) of a pass; raises AccuracyInputsMissing."""
    if handle.spec.accuracy is None:
        raise AccuracyInputsMissing(f"baselines/{handle.spec.name}.yaml declares no accuracy gate")
    missing = missing_accuracy_inputs(handle.spec, roots, checkpoints=not seeded)
    if missing:
        raise AccuracyInputsMissing("stage " + "; ".join(missing))
    weights = {
        n: handle.seeded_weights() if seeded else WeightsChoice(find_checkpoint(handle.spec, n, roots))
        for n in handle.spec.networks
    }
    profile = profile or handle.spec.accuracy.profile
    dims = {**handle.spec.profiles[profile].dims, "batch": handle.spec.profiles[profile].batch_sizes[0]}
    return weights, data_paths(handle.spec, roots), dims


def _fingerprint(handle: ModelHandle, backend_name: str, weights, paths, dims, oracles) -> dict[str, Any]:
    # Content, not size and mtime: a checkpoint copied with cp -p, an image replaced in place or
    # an edit to shared code must not resume a stale score.
    return {
        "backend": backend_name,
        "code": handle.backend_code_digest(handle.ws.backend(backend_name), *SCORING_CODE),
        "weights": {n: w.label for n, w in weights.items()},
        "checkpoints": {n: content_digest(w.path) for n, w in weights.items() if w.path},
        "data": {name: content_digest(p) for name, p in paths.items()},
        "dims": dims,
        "exporters": handle.ws.options.exporters,
        "oracles": sorted(oracles),
    }


def _pass_dir(handle: ModelHandle, fingerprint: dict[str, Any]) -> Path:
    run_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return handle.ws.roots.cache_dir / "runs" / handle.spec.name / run_id
