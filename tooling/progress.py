"""Progress reporting and resumable per-sample results for long accuracy passes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np

from tooling.cache import LockTimeout, hold_lock, lock_holder, raise_if_full

FINGERPRINT = "fingerprint.json"
SAMPLE_FIGURES = "samples.json"  # sample id -> figures, next to metrics.json in a run folder


@contextlib.contextmanager
def owned_run(run_dir: Path, what: str) -> Iterator[Path]:
    """Own an accuracy run folder for the duration of a pass; yields the folder to score into.

    One process at a time writes a run folder: it holds ``<run_dir>.lock`` (the cache's lock
    discipline, ``tooling.cache.hold_lock``: the holder named in its lease). A process that finds
    the folder owned by another live one does not wait for it (a quick ``--accuracy-limit`` look
    would wait for the whole nightly pass) and never touches its records: it scores into a private
    folder next to it, ``<run_dir>.<host>-<pid>``, under its own lock, says so on stderr, and
    deletes that folder when the pass ends. Create the ``ResultStore`` only inside this context:
    its start-up clean-up (stale fingerprint, ``restart``, half-written records) is safe only
    while the folder is owned.
    """
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hold_lock(run_lock(run_dir), what, timeout_s=0))
            folder = run_dir
        except LockTimeout:
            holder = lock_holder(run_lock(run_dir))
            folder = run_dir.with_name(f"{run_dir.name}.{socket.gethostname()}-{os.getpid()}")
            stack.enter_context(hold_lock(run_lock(folder), what))
            stack.callback(shutil.rmtree, folder, True)  # runs before the lock above is released
            print(f"zoo: {run_dir} is being scored by {holder}; this pass ({what}) scores into "
                  f"{folder.name} and resumes nothing", file=sys.stderr, flush=True)
        yield folder


def run_lock(run_dir: Path) -> Path:
    """The lock that says who owns the accuracy run folder ``run_dir``."""
    return run_dir.with_name(f"{run_dir.name}.lock")


class ResultStore:
    """Per-sample arrays on disk, so a killed accuracy pass resumes where it stopped.

    Each record is written to a private temporary file and renamed into place, so a record either
    exists whole or not at all. The store is tied to a fingerprint (artifact, backend, dataset
    files); a different fingerprint, or ``restart=True``, wipes it rather than mixing results.
    Its folder must be owned (``owned_run``) while the store is created and used.
    """

    def __init__(self, directory: Path, fingerprint: dict, restart: bool = False):
        self.directory = Path(directory)
        encoded = json.dumps(fingerprint, sort_keys=True, default=str)
        marker = self.directory / FINGERPRINT
        stale = not marker.is_file() or marker.read_text() != encoded
        if restart or stale:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".*.tmp.npz"):  # a record whose writer was killed
            leftover.unlink(missing_ok=True)
        if not marker.is_file():
            marker.write_text(encoded)
        self.resumed = len(self.completed())
        self.computed = 0  # records computed (not loaded) by this process: what a rate may count

    def _path(self, sample_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id)
        if safe != sample_id:
            safe += "-" + hashlib.sha256(sample_id.encode()).hexdigest()[:8]
        return self.directory / f"{safe}.npz"

    def record_path(self, sample_id: str) -> Path:
        """Where the record of ``sample_id`` is kept (whether or not it exists yet)."""
        return self._path(sample_id)

    def completed(self) -> list[Path]:
        return [p for p in self.directory.glob("*.npz") if not p.name.startswith(".")]

    def load(self, sample_id: str) -> dict[str, np.ndarray] | None:
        path = self._path(sample_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            path.unlink(missing_ok=True)  # unreadable record: recompute rather than trust it
            return None

    def save(self, sample_id: str, arrays: dict[str, np.ndarray]) -> None:
        path = self._path(sample_id)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise_if_full(exc, self.directory, f"the accuracy record of sample {sample_id!r}")
            raise

    def cached(self, sample_id: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        record = self.load(sample_id)
        if record is None:
            record = compute()
            self.computed += 1
            self.save(sample_id, record)
        return record


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# Where progress lines go when a reporter is given no stream. The pytest plugin points it at the
# terminal with capture suspended, so a 17-minute accuracy pass shows its progress while it runs
# rather than only in a failed test's captured output.
_live_sink: list[Callable[[str], None]] = [_stderr_line]


def set_live_sink(sink: Callable[[str], None] | None) -> None:
    """Send progress lines to ``sink`` (None: back to stderr)."""
    _live_sink[0] = sink or _stderr_line


def say(line: str) -> None:
    """One line to where progress goes (the terminal under pytest -n 0, else stderr)."""
    _live_sink[0](line)


class ProgressReporter:
    """Prints ``label: done/total unit, rate/s, ETA`` at most every ``interval`` seconds, to
    ``stream`` or else the live sink (the terminal under pytest), and keeps the last line in
    ``logfile``.

    The rate counts only work done by this run: with ``fresh`` (how many records this process has
    computed so far, e.g. ``ResultStore.computed``) every progress call made before the first fresh
    record moves the starting point, so records resumed from disk, however many and in whatever
    order they are reported, never inflate the rate or shorten the ETA. Without ``fresh`` the first
    call is taken as the start.
    """

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 5.0, logfile: Path | None = None,
                 fresh: Callable[[], int] | None = None):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.logfile = logfile
        self.fresh = fresh
        self.start = time.monotonic()
        self.last = 0.0
        self.first_done: int | None = 0 if fresh is not None else None

    def __call__(self, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if self.first_done is None or (self.fresh is not None and self.fresh() == 0):
            self.first_done = done  # records resumed from disk do not count towards the rate
            self.start = now
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        fresh = done - self.first_done
        rate = fresh / elapsed if fresh else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        line = f"{self.label}: {done}/{total} {unit}, {rate:.2f} {unit}/s, ETA {_clock(eta)}"
        if self.stream is not None:
            print(line, file=self.stream, flush=True)
        else:
            _live_sink[0](line)
        if self.logfile is not None:
            self.logfile.write_text(line + "\n")


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
