"""The shared conformance gates. A model's test module subclasses ``ConformanceSuite`` and names
its model; the plugin parametrizes every gate from ``baselines/<model>.yaml``:

    class TestVideoPose3D(ConformanceSuite):
        model = "videopose3d"
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from tooling import planning
from tooling.accuracy import AccuracyInputsMissing, moves_against_reference, run_accuracy
from tooling.arrays import read_arrays
from tooling.compare import ComparisonError, assert_outputs_match
from tooling.gates import GATES, gate, serving_backends
from tooling.model_spec import Case, ChainCase
from tooling.pictures import png_bytes
from tooling.progress import SAMPLE_FIGURES
from tooling.report import ThroughputEntry
from tooling.roofline import host_peak_gflops
from tooling.shards import Shard, parse_merge
from tooling.sources import UpstreamDependencyMissing, UpstreamNotStaged
from tooling.speed import InterleavedRounds, merge
from tooling.triage import TriageUnsupported, triage_case
from tooling.weights import WeightsChoice
from tooling.workspace import Workspace


# Rounds per measurement block of the speed-up gate (at least; a profile may ask for more), and
# how many blocks it measures before it fails: noise only ever slows a round down.
SPEEDUP_MIN_ROUNDS = 10
SPEEDUP_ATTEMPTS = 3


def call_seconds(session, rounds: int, host_mean_s: float, host_min_s: float) -> tuple[float, float]:
    """(mean, best) seconds per call, what a throughput figure divides by: the device's own timing
    of the last ``rounds`` calls where the session reports one (ais_bench's NPU compute time, the
    guides' figure; CUDA events), else the host wall times pytest-benchmark measured."""
    device_times_ms = getattr(session, "device_times_ms", None)
    if device_times_ms is None:
        return host_mean_s, host_min_s
    times = device_times_ms()[-rounds:]
    return float(np.mean(times)) / 1000.0, float(np.min(times)) / 1000.0


def relabel(request: pytest.FixtureRequest, **cell) -> None:
    """Name a row by what it turned out to check (an oracle run is not a deployed-backend run)."""
    request.node.user_properties.append(("zoo_relabel", cell))


def record(request: pytest.FixtureRequest, **result) -> None:
    """Attach figures to the test report; the plugin puts them in the conformance matrix and JSON."""
    request.node.user_properties.append(("zoo_result", result))


def pass_records(run_dir: Path) -> dict:
    """Where an accuracy pass kept its records (printed when it started) and its figures per
    sample, by sample name, for the JSON report and the run history."""
    path = run_dir / SAMPLE_FIGURES
    samples = json.loads(path.read_text()) if path.is_file() else {}
    return {"run_dir": str(run_dir), "samples": samples}


def disagreement_pictures(handle, largest: dict, path: Path) -> dict[str, str]:
    """The slice's picture of the call that deviated most from torch eager (relative to its
    tolerance), saved as PNG: caption -> file. Empty where the slice draws none; a drawing that
    fails is said in the caption's place rather than failing the gate."""
    if largest.get("network") is None:
        return {}
    try:
        picture = handle.slice.disagreement_picture(largest["network"], largest["feeds"], largest["reference"],
                                                    largest["actual"])
    except Exception as exc:  # noqa: BLE001 - a picture is an aid, the verdict stands without it
        print(f"{handle.spec.name}: no disagreement picture ({type(exc).__name__}: {exc})")
        return {}
    if picture is None:
        return {}
    path.write_bytes(png_bytes(picture))
    return {f"largest deviation: {largest['where']}, {largest['deviation']:.2g}x its tolerance": str(path)}


def output_figures(stats) -> dict[str, dict[str, float]]:
    """Per output: the error quantiles a comparison measured and the absolute bound it applied
    (the history's drift check and the report's plots read them)."""
    return {s.name: {"max_abs": s.max_abs, "p99_abs": s.p99_abs, "mean_abs": s.mean_abs, "atol": s.atol} for s in stats}


def triaged(failure: ComparisonError, request, handle, case: Case, backend: str, feeds) -> ComparisonError:
    """The parity failure with its first diverging graph node appended, recorded for the JSON report
    too; a triage that cannot run says why instead of hiding the original failure."""
    try:
        report = triage_case(handle, case, backend, feeds)
        record(request, triage=report.as_dict())
        detail = report.summary()
        if report.first is None:
            detail += (" (with every intermediate exposed the backend cannot fuse across nodes: the "
                       "divergence lives in a fused kernel)")
    except TriageUnsupported as exc:
        record(request, triage={"unsupported": str(exc)})
        detail = f"first-divergence triage: {exc}"
    except Exception as exc:  # noqa: BLE001 - the parity failure must still be reported as such
        record(request, triage={"error": f"{type(exc).__name__}: {exc}"})
        detail = f"first-divergence triage could not run: {type(exc).__name__}: {exc}"
    return ComparisonError(f"{failure}\n{detail}")


class ConformanceSuite:
    model: str = ""

    @gate("golden")
    def test_port_matches_golden(self, zoo: Workspace, golden: dict):
        """The port reproduces outputs the upstream code computed under the seeded init."""
        handle = zoo.model(self.model)
        net = handle.spec.networks[golden["network"]]
        path = handle.spec.fixtures / "golden" / golden["file"]
        arrays = read_arrays(path)
        feeds = handle.slice.golden_inputs(handle.spec, net.name, path, arrays)
        expected = {name: arrays[name] for name in net.output_names}
        weights = WeightsChoice(None, golden.get("salt", "public"))
        module, _ = handle.network(net.name, golden.get("variant"), weights)
        from tooling.backends.cpu import TorchSession

        actual = TorchSession(module, net.input_names, net.output_names).run(feeds)
        assert_outputs_match(actual, expected, net.outputs, f"{self.model}/{net.name} port vs {path.name}")

    @gate("onnx-vs-torch")
    def test_onnx_matches_torch(self, zoo: Workspace, case: Case, request):
        handle = zoo.model(self.model)
        net = handle.spec.networks[case.network]
        onnx_out = handle.session("onnx", case).run(handle.feeds(case))
        try:
            stats = assert_outputs_match(onnx_out, handle.reference(case), net.outputs, f"{case.id}: ONNX vs torch")
        except ComparisonError as failure:
            raise triaged(failure, request, handle, case, "onnx", handle.feeds(case)) from None
        record(request, worst_max_abs=max(s.max_abs for s in stats), outputs=output_figures(stats))

    @gate("deployed-vs-onnx")
    def test_deployed_matches_onnx(self, zoo: Workspace, case: Case, deployed_backend: str, request):
        handle = zoo.model(self.model)
        feeds = handle.feeds(case)
        # A variant no ONNX runtime here can execute (an Ascend custom node) is held to torch instead.
        onnx_runs = handle.spec.networks[case.network].variant(case.variant).runs_on("onnxruntime")
        expected = handle.session("onnx", case).run(feeds) if onnx_runs else handle.reference(case)
        actual = handle.session(deployed_backend, case).run(feeds)
        tolerances = planning.tolerances(handle.spec, case.network, deployed_backend)
        reference = "ONNX" if onnx_runs else "torch (no ONNX runtime for this variant)"
        try:
            stats = assert_outputs_match(actual, expected, tolerances, f"{case.id}: {deployed_backend} vs {reference}")
        except ComparisonError as failure:
            raise triaged(failure, request, handle, case, deployed_backend, feeds) from None
        record(request, worst_max_abs=max(s.max_abs for s in stats), outputs=output_figures(stats))

    @gate("decoded-vs-torch")
    def test_decoded_outputs_agree(self, zoo: Workspace, case: Case, deployed_backend: str):
        """What the task reports (poses, keypoints, flow) agrees, not only the raw tensors."""
        handle = zoo.model(self.model)
        feeds = handle.feeds(case)
        expected = handle.slice.decode(case.network, feeds, handle.reference(case))
        actual = handle.slice.decode(case.network, feeds, handle.session(deployed_backend, case).run(feeds))
        decoded = planning.tolerances(handle.spec, case.network, deployed_backend, decoded=True)
        key = planning.tolerance_key(handle.spec, case.network, deployed_backend)
        assert_outputs_match(actual, expected, decoded, f"{case.id}: decoded {deployed_backend} vs torch ({key})")

    @gate("chain-vs-torch")
    def test_chain_matches_torch(self, zoo: Workspace, chain_case: ChainCase, deployed_backend: str, request):
        """Networks that feed each other (yaml ``chains``), each deployed, agree with the same chain
        in torch eager: what one backend's first network outputs is what its next one consumes."""
        handle = zoo.model(self.model)
        expected = handle.run_chain(chain_case, "torch", served_by=deployed_backend)
        actual = handle.run_chain(chain_case, deployed_backend)
        tolerances = planning.chain_tolerances(handle.spec, chain_case.chain, deployed_backend)
        stats = assert_outputs_match(actual, expected, tolerances, f"{chain_case.id}: {deployed_backend} vs torch")
        record(request, worst_max_abs=max(s.max_abs for s in stats), outputs=output_figures(stats))

    @gate("port-vs-upstream")
    def test_port_matches_upstream(self, zoo: Workspace, case: Case, request):
        """The port matches the pinned upstream code under the same seeded weights. Upstream not
        staged: skip. Staged but a package its code imports is missing: fail, naming the install
        command (a host that stages upstream asked for this gate). Any stand-in the upstream import
        needed (e.g. for torchvision) is named in the result and the message."""
        handle = zoo.model(self.model)
        seeded = WeightsChoice(None, zoo.options.salt)
        try:
            upstream, _ = handle.network(case.network, case.variant, seeded, source="upstream")
        except UpstreamNotStaged as exc:
            pytest.skip(str(exc))
        except UpstreamDependencyMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        from tooling.backends.cpu import TorchSession

        checkout = handle.upstream_checkout(case.network)
        stand_ins = sorted(set(checkout.stand_ins.values()))
        for line in stand_ins:
            print(f"{case.id}: upstream stand-in: {line}")
        if checkout.absent:  # data only: a mirror lacking code is refused when checked out
            print(f"{case.id}: upstream {checkout.root.name} lacks {len(checkout.absent)} data file(s) its mirror "
                  f"did not carry: {', '.join(checkout.absent)}")
        net = handle.spec.networks[case.network]
        feeds = handle.feeds(case)
        actual = TorchSession(handle.network(case.network, case.variant, seeded)[0], net.input_names, net.output_names).run(feeds)
        expected = TorchSession(upstream, net.input_names, net.output_names).run(feeds)
        what = f"{case.id}: port vs upstream" + "".join(f" [{line}]" for line in stand_ins)
        stats = assert_outputs_match(actual, expected, net.outputs, what)
        record(request, worst_max_abs=max(s.max_abs for s in stats), outputs=output_figures(stats),
               upstream_stand_ins=stand_ins, upstream_checkout=checkout.root.name,
               upstream_absent_files=list(checkout.absent))

    @gate("accuracy")
    def test_accuracy_on_staged_dataset(self, zoo: Workspace, accuracy_backend: str, accuracy_part, request):
        """The guide's dataset metric meets its target. Under --accuracy-shards N the pass is N
        shard items (each scores its part, resumable on its own, possibly on another device or
        host) and a merge item that computes the figure from every shard's records and holds the
        verdict; a shard missing or damaged at the merge is named and fails it."""
        handle = zoo.model(self.model)
        accuracy = handle.spec.accuracy
        shard = accuracy_part if isinstance(accuracy_part, Shard) else None
        shards = parse_merge(accuracy_part) if isinstance(accuracy_part, str) else 1
        try:
            metrics = run_accuracy(handle, accuracy_backend, limit=zoo.options.accuracy_limit, shard=shard, shards=shards)
        except AccuracyInputsMissing as exc:
            pytest.skip(f"{self.model} accuracy needs staged inputs: {exc}")
        if shard is not None:
            record(request, shard=metrics)
            print(f"{self.model} accuracy {shard.label} on {accuracy_backend}: {metrics}")
            return
        value = metrics[accuracy.metric]
        moves = moves_against_reference(handle, accuracy_backend, metrics, zoo.options.accuracy_limit)
        record(request, metrics=metrics, metric=accuracy.metric, target=accuracy.target, **moves,
               **pass_records(handle.last_run_dir))
        print(f"{self.model} {accuracy.metric} = {value:.4f} on {accuracy_backend} (target {accuracy.target})")
        for backend, moved in ({accuracy_backend: moves["moves_vs_reference"]} if "moves_vs_reference" in moves
                               else moves.get("deployed_moves", {})).items():
            print(f"{self.model}: {backend} moved " + ", ".join(f"{m} {d:+.4g}" for m, d in moved.items())
                  + f" from the torch eager reference on this set")
        if zoo.options.accuracy_limit is not None:
            pytest.skip(
                f"quick look on the first {zoo.options.accuracy_limit} samples: {accuracy.metric}={value:.4f} "
                f"(not gated: the target applies to the full set)"
            )
        comparison = ">=" if accuracy.higher_is_better else "<="
        assert accuracy.passes(value), (
            f"{self.model} {accuracy.metric} = {value:.4f}, needs {comparison} {accuracy.target} "
            f"(tolerance {accuracy.tolerance}); all metrics: {metrics}"
        )
        for name, target in accuracy.extra_targets.items():
            assert accuracy.passes_extra(name, metrics[name]), f"{self.model} {name} = {metrics[name]:.4f} vs {target}"

    @gate("accuracy-known-answer")
    def test_accuracy_pipeline_known_answer(self, zoo: Workspace, known_answers, tmp_path, request):
        """The accuracy path (reader, preprocessing, postprocessing, metric) on generated data whose
        correct score is known in advance. Where the slice's answer replaces a network by an oracle
        (ideal heatmaps, say), no export or deployed run of that network happens, and the row is
        labelled ``accuracy-oracle``; otherwise the network runs exported, on ONNX Runtime."""
        answer = known_answers(self.model)
        if answer.oracles:
            relabel(request, gate="accuracy-oracle", backend="oracle:" + "+".join(sorted(answer.oracles)))
        handle = zoo.with_roots(data_root=answer.data_root, weights_root=answer.weights_root).model(self.model)
        metrics = run_accuracy(
            handle, "onnxruntime", profile=answer.profile, label=f"{self.model} known answer",
            oracles=answer.oracles, run_dir=tmp_path / "run",
        )
        record(request, metrics=metrics, metric=handle.spec.accuracy.metric, expected=answer.expected,
               **pass_records(tmp_path / "run"))
        for name, want in answer.expected.items():
            assert metrics[name] == pytest.approx(want, abs=answer.tolerance), f"{name}: got {metrics[name]}, want {want}"

    @gate("accuracy-agreement")
    def test_accuracy_agrees_with_torch(self, zoo: Workspace, deployed_backend: str, known_answers,
                                        agreement_references, tmp_path, request):
        """Network in the loop: the accuracy pipeline on the known-answer dataset, with no oracle,
        on a deployed backend, with the slice's calibrated agreement checkpoints (seeded weights
        where it has none), so the metrics are neither 0 nor perfect. Every network call's raw
        outputs (backend tolerances) and decoded outputs (``decoded`` tolerances) agree with torch
        eager on the same feeds, and no metric moves further from the torch eager pipeline's than
        ``accuracy.agreement`` allows (``agreement_by_backend`` for a precision that rounds, such as
        an fp16 OM): the deployed backend must not move AP or MPJPE."""
        spec = zoo.model(self.model).spec
        assert spec.accuracy and spec.accuracy.agreement, (
            f"baselines/{self.model}.yaml: accuracy.agreement names no metric bound for the deployed backends"
        )
        answer = known_answers(self.model)
        if not any(planning.case_runs_on(spec, c, deployed_backend) for c in planning.cases(spec)
                   if c.profile == answer.profile):
            pytest.skip(f"{deployed_backend} serves no case of profile {answer.profile} (the known-answer set's)")
        agreement = agreement_references(self.model)
        result = agreement.run(zoo, deployed_backend, tmp_path)
        record(request, metrics=result.metrics, torch_metrics=result.reference, metric_deltas=result.deltas,
               metric_bounds=result.bounds,
               calls=result.calls, agreement_weights=agreement.weights_label,
               worst_max_abs=max(result.worst.values(), default=0.0), **pass_records(tmp_path / f"run-{deployed_backend}"),
               pictures=disagreement_pictures(agreement.handle, result.largest,
                                              tmp_path / f"disagreement-{deployed_backend}.png"))
        failure = result.failure()
        assert failure is None, failure

    @gate("throughput")
    def test_throughput(self, zoo: Workspace, case: Case, backend: str, benchmark, request):
        """A device backend (NPU, GPU) against the guide's floor for this device class and shape.
        CPU backends are timed, interleaved with torch eager, by the speed-up gate instead."""
        if benchmark.disabled:
            pytest.skip("benchmarks run in the separate -n 0 pass (pytest-benchmark is off under xdist)")
        handle = zoo.model(self.model)
        spec = handle.spec
        session = handle.session(backend, case)
        feeds = handle.feeds(case)
        session.run(feeds)  # first call pays one-off allocation and kernel selection
        rounds = spec.profiles[case.profile].benchmark_rounds
        benchmark.pedantic(session.run, args=(feeds,), rounds=rounds, warmup_rounds=1, iterations=1)
        host_mean_s = benchmark.stats.stats.mean
        mean_s, best_s = call_seconds(session, rounds, host_mean_s, benchmark.stats.stats.min)
        items = spec.throughput.items(spec.dims(case), case.batch)
        target = zoo.backend(backend)
        device = target.device_class()
        entry = ThroughputEntry(self.model, case.id, backend, device, items / mean_s, spec.throughput.unit,
                                mean_s, best_s)
        attach_roofline(zoo, handle, case, entry)
        figures = {**entry.as_dict(), "timing_scope": target.timing_scope, "host_mean_s": host_mean_s,
                   "device_id": target.config.device}
        benchmark.extra_info.update(figures)
        record(request, throughput=figures)
        floor = spec.throughput.floor(device, case.profile, case.batch)
        if floor is None:
            pytest.skip(f"measured only: {backend} on {device}: {entry.rate:.1f} {spec.throughput.unit}; the guide "
                        f"measured no {device} figure at {case.profile} b{case.batch}, so this shape is not gated")
        assert entry.rate >= floor, f"{backend} on {device}: {entry.rate:.1f} {spec.throughput.unit} < floor {floor}"

    @gate("cpu-speedup")
    def test_cpu_speedup_over_torch(self, zoo: Workspace, case: Case, benchmark, request):
        """On CPU runners the best deployed backend must beat torch eager. Every contender runs on
        the same inputs in interleaved rounds, and the gate reads the median per-round ratio, so a
        noisy neighbour slows both sides of a ratio; below the floor it measures again before
        failing. Each backend's throughput from the same rounds is reported as a measurement."""
        if benchmark.disabled:
            pytest.skip("benchmarks run in the separate -n 0 pass (pytest-benchmark is off under xdist)")
        handle = zoo.model(self.model)
        spec = handle.spec
        contenders, unavailable = {}, {}
        # A backend whose rows on this case are nightly-only is timed in the nightly tier only.
        for name in serving_backends(spec, case, GATES["cpu-speedup"], zoo.options.backends, zoo.options.nightly):
            availability = zoo.availability(name)
            if availability.ok:
                contenders[name] = handle.session(name, case)
            else:
                unavailable[name] = availability.reason
        if not contenders:
            pytest.skip(f"no deployed CPU backend available: {unavailable}")
        feeds = handle.feeds(case)
        calls = {"torch": handle.session("torch", case), **contenders}
        for session in calls.values():
            session.run(feeds)  # first call pays one-off allocation and kernel selection
        # That first call is each session's warm-up: every round is measured (a slow one moves no median).
        rounds = InterleavedRounds({name: partial(s.run, feeds) for name, s in calls.items()}, warmup=0)
        per_block = max(spec.profiles[case.profile].benchmark_rounds, SPEEDUP_MIN_ROUNDS)
        benchmark.pedantic(rounds, rounds=per_block, warmup_rounds=rounds.warmup, iterations=1)
        floor = spec.throughput.cpu_speedup_vs_torch
        blocks = [rounds.timings()]
        while True:
            ratios = {name: blocks[-1].median_ratio("torch", name) for name in contenders}
            if max(ratios.values()) >= floor or len(blocks) == SPEEDUP_ATTEMPTS:
                break
            rounds = InterleavedRounds(rounds.calls, warmup=0)  # measure again before failing
            rounds.run(per_block)
            blocks.append(rounds.timings())
        measured = merge(blocks)
        items = spec.throughput.items(spec.dims(case), case.batch)
        for name in calls:
            entry = ThroughputEntry(
                self.model, case.id, name, "cpu", items / measured.mean_s(name), spec.throughput.unit,
                measured.mean_s(name), measured.min_s(name),
                None if name == "torch" else round(ratios[name], 3),
            )
            attach_roofline(zoo, handle, case, entry)
            record(request, throughput={**entry.as_dict(), "timing_scope": zoo.backend(name).timing_scope,
                                        "measured_only": True})
        best = max(ratios, key=ratios.get)
        attempts = [{n: round(b.median_ratio("torch", n), 3) for n in contenders} for b in blocks]
        record(request, speedups={n: round(r, 3) for n, r in ratios.items()}, best=best, floor=floor,
               attempts=attempts, unavailable=unavailable,
               ratio_samples={n: [round(r, 4) for r in measured.ratios("torch", n)] for n in contenders})
        benchmark.extra_info.update(speedups=ratios, attempts=attempts, floor=floor)
        summary = ", ".join(f"{n} {r:.2f}x" for n, r in sorted(ratios.items(), key=lambda kv: -kv[1]))
        print(f"{self.model} {case.id}: median per-round speedup over torch eager: {summary}"
              f" ({len(blocks)} block(s) of {per_block} rounds)")
        assert ratios[best] >= floor, (
            f"best deployed CPU backend {summary} (median of {per_block} interleaved rounds, "
            f"{len(blocks)} attempts: {attempts}); floor {floor}x torch eager"
        )


def attach_roofline(zoo: Workspace, handle, case: Case, entry: ThroughputEntry) -> None:
    """GFLOP/s of a throughput row and, on CPU, its fraction of this host's GEMM peak at the run's
    thread count. A figure, never a gate: a graph it cannot count leaves the row without one."""
    try:
        flops = handle.graph_flops(case)
    except Exception as exc:  # e.g. a custom-domain node no shape inference knows; say why
        print(f"{case.id}: no roofline figures ({type(exc).__name__}: {exc})")
        return
    peak = host_peak_gflops(zoo.options.threads, zoo.cache.root) if entry.device == "cpu" else None
    entry.attach_roofline(flops.total, peak)

