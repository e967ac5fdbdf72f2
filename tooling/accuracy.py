"""The dataset accuracy pass: a model's slice scores staged (or generated) data with each network
run on one backend, resumably, its records keyed by what the score depends on."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from tooling.backends.cpu import TorchSession
from tooling.cache import CacheNotWritable, denied
from tooling.fingerprint import content_digest
from tooling.jsonio import write_json
from tooling.locations import Roots, data_paths, find_checkpoint, missing_accuracy_inputs
from tooling.progress import SAMPLE_FIGURES, ProgressReporter, ResultStore, owned_run, say
from tooling.slice import AccuracyContext
from tooling.weights import WeightsChoice
from tooling.workspace import ModelHandle

# Engine code a score depends on besides what its artifacts do (and what it imports).
SCORING_CODE = ("tooling.progress",)

CallObserver = Callable[[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None]


class AccuracyInputsMissing(RuntimeError):
    """The dataset or checkpoints for an accuracy pass are not staged; the message lists the paths."""


def run_accuracy(handle: ModelHandle, backend_name: str, *, roots: Roots | None = None, profile: str | None = None,
                 limit: int | None = None, label: str | None = None,
                 oracles: Mapping[str, Any] | None = None, run_dir: Path | None = None,
                 seeded: bool = False, observe: CallObserver | None = None) -> dict[str, float]:
    """Score the staged dataset on ``backend_name`` with the staged checkpoints.

    ``oracles`` replaces the named networks by stand-ins (known-answer runs only); ``run_dir``
    holds the resumable records (default: a directory per input fingerprint in the cache);
    ``seeded`` runs every network on seeded weights instead of checkpoints; ``observe`` sees
    each network call's feeds and outputs (the agreement gate re-runs them on torch).
    """
    roots = roots or handle.ws.roots
    if handle.spec.accuracy is None:
        raise AccuracyInputsMissing(f"baselines/{handle.spec.name}.yaml declares no accuracy gate")
    missing = missing_accuracy_inputs(handle.spec, roots, checkpoints=not seeded)
    if missing:
        raise AccuracyInputsMissing("stage " + "; ".join(missing))
    weights = {
        n: handle.seeded_weights() if seeded else WeightsChoice(find_checkpoint(handle.spec, n, roots))
        for n in handle.spec.networks
    }
    paths = data_paths(handle.spec, roots)
    profile = profile or handle.spec.accuracy.profile
    dims = {**handle.spec.profiles[profile].dims, "batch": handle.spec.profiles[profile].batch_sizes[0]}
    oracles = dict(oracles or {})

    def run(network: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if network in oracles:
            return oracles[network](feeds)
        case = handle.case_for_feeds(network, feeds, backend_name)
        outputs = handle.session(backend_name, case, weights[network]).run(feeds)
        for name, value in outputs.items():
            bad = int(np.count_nonzero(~np.isfinite(value))) if np.issubdtype(value.dtype, np.floating) else 0
            if bad and not handle.spec.tolerance(network, name, backend_name).allow_nonfinite:
                raise FloatingPointError(
                    f"{handle.spec.name}/{network} on {backend_name}: output {name} holds {bad} NaN/Inf values "
                    f"(inputs {sorted(feeds)}); a score computed from them would be meaningless"
                )
        if observe is not None:
            observe(network, feeds, outputs)
        return outputs

    # Content, not size and mtime: a checkpoint copied with cp -p, an image replaced in place or
    # an edit to shared code must not resume a stale score.
    fingerprint = {
        "backend": backend_name,
        "code": handle.backend_code_digest(handle.ws.backend(backend_name), *SCORING_CODE),
        "weights": {n: w.label for n, w in weights.items()},
        "checkpoints": {n: content_digest(w.path) for n, w in weights.items() if w.path},
        "data": {name: content_digest(p) for name, p in paths.items()},
        "dims": dims,
        "exporters": handle.ws.options.exporters,
        "oracles": sorted(oracles),
    }
    run_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_dir = run_dir or handle.ws.roots.cache_dir / "runs" / handle.spec.name / run_id
    with contextlib.ExitStack() as owned:
        try:
            run_dir = owned.enter_context(owned_run(run_dir, label or f"score {handle.spec.name} on {backend_name}"))
            store = ResultStore(run_dir / "records", fingerprint, restart=handle.ws.options.restart_accuracy)
        except OSError as exc:
            if not denied(exc):
                raise
            raise CacheNotWritable(
                f"{run_dir}: cannot keep the resumable records of this accuracy pass ({exc.strerror}); "
                "use a writable --cache-dir"
            ) from None
        reporter = ProgressReporter(label or f"{handle.spec.name} accuracy on {backend_name}",
                                    logfile=run_dir / "progress.txt", fresh=lambda: store.computed)
        def run_host(network: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            if network in oracles:
                return oracles[network](feeds)
            net = handle.spec.networks[network]
            return TorchSession(handle.network(network, None, weights[network])[0], net.input_names, net.output_names).run(feeds)

        ctx = AccuracyContext(
            spec=handle.spec, data_paths=paths, run=run, progress=reporter, results=store,
            host_network=lambda name: handle.network(name, None, weights[name])[0],
            limit=limit, scratch=run_dir, dims=dims, run_host=run_host,
        )
        say(f"{reporter.label}: records in {run_dir}")
        metrics = handle.slice.evaluate(ctx)
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / SAMPLE_FIGURES, ctx.sample_figures)
    handle.last_run_dir = run_dir  # where the gate finds the per-sample figures of this pass
    return metrics
