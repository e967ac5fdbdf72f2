"""Generated runs shaped like the CPU tier's (five models, their gates, backends, outputs, ratio
samples, per-sample figures, one disagreement picture per model and backend), for the report's
tests and for measuring the history's size and the report's rendering time without running the
suite hundreds of times. Never used by a real run."""
from __future__ import annotations

import numpy as np

from tooling.history.store import CellRecord, RunRecord

MODELS = {  # model -> (outputs, accuracy metric, its value, per-sample figure)
    "videopose3d": (("pose3d",), "mpjpe_p1_mm", 46.0, "mpjpe_mm"),
    "transpose": (("heatmaps",), "AP", 0.74, "ap_contribution"),
    "dekr": (("heatmap", "offset"), "AP", 0.68, "ap_contribution"),
    "gma": (("flow_low", "flow_up"), "clean_1px", 93.0, "epe"),
    "fomm": (("value", "jacobian", "prediction"), "AKD", 6.5, "akd"),
}
BACKENDS = ("onnxruntime", "openvino")
ENV = {"host": "ci-runner", "cpu_model": "Generated CPU @ 2.0GHz", "device": "cpu", "threads": 1,
       "versions": {"python": "3.11.7", "torch": "2.13.0", "onnxruntime": "1.31.1", "openvino": "2026.4.1"}}


def picture(rng: np.random.Generator, size: tuple[int, int] = (240, 320)) -> bytes:
    """A PNG about as compressible as a drawn disagreement picture (smooth fields plus detail)."""
    import cv2

    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (17 + 3 * k)) * np.cos(y / 23) for k in range(3)], -1)
    image = ((base + 1) * 100 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def generated_run(n: int, *, models=tuple(MODELS), samples_per_pass: int = 40, slowdown: dict | None = None,
                  failing: tuple[str, str, str, str] | None = None, pictures: bool = True) -> RunRecord:
    """Run ``n`` (started n hours after an epoch): steady figures with realistic noise, optionally
    one backend slowed (``slowdown={backend: fraction}``) and one cell failing."""
    rng = np.random.default_rng(n)
    slowdown = slowdown or {}
    cells: list[CellRecord] = []
    samples: list[tuple] = []
    shots: list[tuple] = []
    for m, model in enumerate(models):
        outputs, metric, value, per_sample = MODELS[model]
        for case in (f"{model}-smoke-b1-torchscript", f"{model}-smoke-b2-torchscript"):
            worst = {o: 1e-6 * (1 + k) * (1 + 0.1 * rng.random()) for k, o in enumerate(outputs)}
            figures = {f"outputs.{o}.{s}": w * f for o, w in worst.items()
                       for s, f in (("max_abs", 1.0), ("p99_abs", 0.3), ("mean_abs", 0.05))}
            figures.update({f"outputs.{o}.atol": 1e-4 for o in outputs}, worst_max_abs=max(worst.values()))
            cells.append(CellRecord(model, "onnx-vs-torch", case, "onnx", "passed", "", dict(figures),
                                    text=f"{max(worst.values()):.0e}"))
            for backend in BACKENDS:
                cells.append(CellRecord(model, "deployed-vs-onnx", case, backend, "passed", "", dict(figures),
                                        text=f"{max(worst.values()):.0e}"))
                cells.append(CellRecord(model, "decoded-vs-torch", case, backend, "passed", "", {}, text="ok"))
            torch_rate = 40.0 / (1 + m)
            cells.append(CellRecord(model, "cpu-speedup", case, "torch", "passed", "",
                                    {"throughput.rate": torch_rate, "throughput.achieved_gflops": 20.0,
                                     "throughput.peak_gflops": 90.0}, text="1x"))
            for k, backend in enumerate(BACKENDS):
                ratio = (1.6 + 0.3 * k) / (1 + slowdown.get(backend, 0.0))
                ratios = list(ratio * (1 + 0.03 * rng.standard_normal(30)))
                speedup = float(np.median(ratios))
                cells.append(CellRecord(model, "cpu-speedup", case, backend, "passed", "",
                                        {"speedup": speedup, "floor": 1.2, "throughput.rate": torch_rate * speedup,
                                         "throughput.achieved_gflops": 20.0 * speedup, "throughput.peak_gflops": 90.0},
                                        {"ratio_samples": ratios}, text=f"{speedup:.2f}x"))
        cells.append(CellRecord(model, "accuracy", "-", "onnxruntime", "skipped",
                                f"{model} accuracy needs staged inputs: stage <data-root>/{model}", text="skip"))
        cells.append(CellRecord(model, "accuracy-known-answer", "-", "onnxruntime", "passed", "",
                                {f"metrics.{metric}": value, f"expected.{metric}": value}, text=f"{value:.4g}"))
        for backend in BACKENDS:
            delta = 1e-5 * rng.random()
            cells.append(CellRecord(model, "accuracy-agreement", "-", backend, "passed", "",
                                    {f"metrics.{metric}": value + delta, f"metric_deltas.{metric}": delta},
                                    text=f"Δ{delta:.0e}"))
            samples += [(model, "accuracy-agreement", backend, f"{model}-sample-{i:04d}", per_sample, float(rng.random()))
                        for i in range(samples_per_pass)]
            if pictures:
                shots.append((model, "accuracy-agreement", backend, "largest disagreement", picture(rng)))
    if failing:
        for cell in cells:
            if cell.key == failing:
                cell.outcome, cell.detail, cell.text = "failed", "injected failure: 12 elements out of tolerance", "FAIL"
    return RunRecord(f"generated-{n:05d}", 1.7e9 + 3600.0 * n, 1.7e9 + 3600.0 * n + 600, 0,
                     {**ENV, "commit": f"{n:040x}"}, cells, samples, shots)


def nightly_passes(run: RunRecord, session_id: str) -> list[RunRecord]:
    """``run`` as a nightly records it: a parity and accuracy pass, then the benchmark pass (the
    ``cpu-speedup`` cells) ten minutes later, both of session ``session_id``."""
    from dataclasses import replace

    bench = [c for c in run.cells if c.gate == "cpu-speedup"]
    return [replace(run, run_id=f"{run.run_id}-parity", cells=[c for c in run.cells if c.gate != "cpu-speedup"],
                    session_id=session_id),
            replace(run, run_id=f"{run.run_id}-benchmark", started=run.started + 600, finished=run.finished + 600,
                    cells=bench, samples=[], pictures=[], session_id=session_id)]
