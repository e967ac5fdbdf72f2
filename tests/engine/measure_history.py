"""Measure the history's costs on generated runs (five models, CPU-tier shaped; see
tooling/history/synthetic.py). Not a test: timings are reported, never asserted.

    .venv/bin/python tests/engine/measure_history.py [--runs 365] [--out /tmp/zoo-history-measure]

Prints: the time one run's comparison and write adds (median over the last 30 runs written), the
report's rendering time from 30 runs (CPU seconds of this one process, and wall), and the size of
a history of N nightly runs.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tooling.history.capture import run_environment  # noqa: E402
from tooling.history.regression import baseline_runs, compare  # noqa: E402
from tooling.history.store import History  # noqa: E402
from tooling.history.synthetic import generated_run  # noqa: E402
from tooling.htmlreport.render import render  # noqa: E402
from tooling.model_spec import PROJECT_ROOT  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=365)
    parser.add_argument("--out", default="/tmp/zoo-history-measure")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = out / "history.sqlite"
    write_s: list[float] = []
    with History(path) as history:
        for n in range(1, args.runs + 1):
            # Pictures are kept for the last 10 runs only: older runs' are not generated (slow), the
            # size is the same; the write is timed over the first 40 runs, each with its pictures.
            timed = n <= 40
            run = generated_run(n, pictures=timed or n > args.runs - 10)
            begin = time.perf_counter()
            if timed:
                run_environment(PROJECT_ROOT, 1, [], [])  # what the plugin gathers per run (git, /proc/cpuinfo)
                compare(run, baseline_runs(history, run))
            history.write_run(run)
            if timed:
                write_s.append(time.perf_counter() - begin)
            if n % 50 == 0:
                print(f"  {n} runs written, {path.stat().st_size / 1e6:.1f} MB", flush=True)
            if n == 30:
                begin, cpu = time.perf_counter(), time.process_time()
                rendered = render(path, out / "report-30")
                render_wall, render_cpu = time.perf_counter() - begin, time.process_time() - cpu
                print(f"report from 30 runs of five models: {render_cpu:.1f} s CPU (one process), "
                      f"{render_wall:.1f} s wall, {rendered.images} images", flush=True)
        cells = len(run.cells)
    size = sum(p.stat().st_size for p in out.glob("history.sqlite*"))
    print(f"history write (compare with the last 7 runs + one transaction), {cells} cells per run: "
          f"median {statistics.median(write_s[-30:]):.3f} s over runs 11-40, max {max(write_s):.3f} s")
    print(f"report from 30 runs of five models: {render_cpu:.1f} s CPU (one process), {render_wall:.1f} s wall, "
          f"{rendered.images} images, {rendered.html.stat().st_size / 1e6:.1f} MB HTML")
    print(f"history of {args.runs} runs: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
