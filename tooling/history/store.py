"""The run history: one SQLite file (stdlib ``sqlite3``) that every pytest run appends itself to.

Written by the controller process only, one transaction per run, in WAL mode so that a reader (the
report, a second host's merge) never blocks the writer. A file that is not ours, or is damaged, is
an error naming it: it is never truncated, replaced or "repaired" by starting afresh.

Schema versions (``PRAGMA user_version``); each step is a migration in ``MIGRATIONS``:
  1  runs, cells (outcome per model/gate/case/backend), figures (scalars per cell)
  2  series (lists of numbers per cell: per-round speed-up ratios), samples (per-sample figures of
     accuracy passes, by sample name)
  3  runs.environment (commit, host, CPU, device, versions, threads, artifacts), cells.text (the
     grid's cell as the terminal showed it) and pictures
  4  runs.session_id: the invocation a run is one pass of (a nightly's or CI's parity, benchmark and
     selftest passes share the ``ZOO_SESSION_ID`` their script exports); a run stored before, or
     started without one, is a session of its own (its run id)
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tooling.jsonio import finite_or_none

APPLICATION_ID = 0x5A4F4F48  # "ZOOH": marks a file as a zoo-conformance history
SCHEMA_VERSION = 4
SQLITE_MAGIC = b"SQLite format 3\x00"


def _cell_table(name: str, columns: str, key: str) -> str:
    """DDL of a table of named values per run and grid cell: every such table starts with the run
    and the cell's model and gate, and is keyed by them plus ``key``."""
    return (f"CREATE TABLE {name} (\n    run_id TEXT NOT NULL, model TEXT NOT NULL, gate TEXT NOT NULL, {columns},\n"
            f"    PRIMARY KEY (run_id, model, gate, {key})\n) WITHOUT ROWID;\n")


# What each version created; a file of any version must end with the same tables, so the text is
# only assembled here, never changed.
_BY_CASE = "case_id TEXT NOT NULL, backend TEXT NOT NULL, name TEXT NOT NULL"
_V1 = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL NOT NULL, exit_status INTEGER,
    host TEXT NOT NULL, host_class TEXT NOT NULL, versions TEXT NOT NULL, commit_sha TEXT
);
CREATE INDEX runs_by_class ON runs(host_class, versions, started);
CREATE TABLE cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id), model TEXT NOT NULL, gate TEXT NOT NULL,
    case_id TEXT NOT NULL, backend TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL,
    PRIMARY KEY (run_id, model, gate, case_id, backend)
) WITHOUT ROWID;
""" + _cell_table("figures", f"{_BY_CASE}, value REAL", "case_id, backend, name")
_V2 = (
    _cell_table("series", f'{_BY_CASE}, "values" TEXT NOT NULL', "case_id, backend, name")
    + _cell_table("samples", "backend TEXT NOT NULL, sample TEXT NOT NULL, name TEXT NOT NULL, value REAL",
                  "backend, sample, name")
)
_V3 = """
ALTER TABLE runs ADD COLUMN environment TEXT NOT NULL DEFAULT '{}';
ALTER TABLE cells ADD COLUMN text TEXT NOT NULL DEFAULT '';
""" + _cell_table("pictures", "backend TEXT NOT NULL, caption TEXT NOT NULL, png BLOB NOT NULL", "backend, caption")
_V4 = """
ALTER TABLE runs ADD COLUMN session_id TEXT NOT NULL DEFAULT '';
UPDATE runs SET session_id = run_id WHERE session_id = '';
CREATE INDEX runs_by_session ON runs(session_id, started);
"""
# MIGRATIONS[v] takes a database at version v to v + 1 (version 0: an empty new file).
MIGRATIONS = {0: _V1, 1: _V2, 2: _V3, 3: _V4}
# Pictures are for looking at recent runs; older runs keep every figure but drop their pictures,
# so a year of nightly runs stays small.
KEEP_PICTURES_RUNS = 10


class HistoryError(Exception):
    """A history file that cannot be used as one (foreign, damaged, newer, locked)."""


@dataclass
class CellRecord:
    model: str
    gate: str
    case: str
    backend: str
    outcome: str
    detail: str = ""
    figures: dict[str, float | None] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    text: str = ""  # the grid cell, as the terminal showed it

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model, self.gate, self.case, self.backend)


@dataclass
class RunRecord:
    run_id: str
    started: float
    finished: float
    exit_status: int | None
    environment: dict[str, Any]
    cells: list[CellRecord] = field(default_factory=list)
    # (model, gate, backend, sample name, figure name, value)
    samples: list[tuple[str, str, str, str, str, float | None]] = field(default_factory=list)
    # (model, gate, backend, caption, PNG bytes)
    pictures: list[tuple[str, str, str, str, bytes]] = field(default_factory=list)
    # The invocation this run is one pass of; empty: a session of its own (see ``session``).
    session_id: str = ""

    @property
    def session(self) -> str:
        return self.session_id or self.run_id

    @property
    def host(self) -> str:
        return str(self.environment.get("host", ""))

    @property
    def host_class(self) -> str:
        return host_class(self.environment)

    @property
    def versions(self) -> str:
        return json.dumps(self.environment.get("versions", {}), sort_keys=True)

    @property
    def label(self) -> str:
        return run_label(self.run_id, self.started, self.environment.get("commit"))


def host_class(environment: dict[str, Any]) -> str:
    """What makes timings comparable: the CPU, the device and the thread count (not the host name:
    identical nightly hosts share a class)."""
    return " | ".join(str(environment.get(k) or "-") for k in ("cpu_model", "device", "threads"))


def run_label(run_id: str, started: float, commit: str | None) -> str:
    import time

    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(started))
    return f"{stamp} UTC ({(commit or 'no commit')[:10]}, run {run_id[:8]})"


class History:
    """An open history file. ``History(path)`` creates it when absent, migrates an older schema in
    one transaction, and refuses anything else with a ``HistoryError`` naming the file."""

    def __init__(self, path: Path | str, *, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise HistoryError(f"{self.path}: no such history file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._check_header()
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._open_schema()  # before switching to WAL, which rewrites the header of a foreign file
        except HistoryError:
            self._close_quietly()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise HistoryError(f"{self.path}: not a usable history database ({exc}); "
                               "it was left untouched: move it away or point --history elsewhere") from None

    # -- opening ---------------------------------------------------------------------------------
    def _check_header(self) -> None:
        if self.path.is_dir():
            raise HistoryError(f"{self.path}: is a directory, not a history file")
        with self.path.open("rb") as handle:
            head = handle.read(100)
        if not head:
            return  # an empty file (say, from `touch`) is a new history
        if not head.startswith(SQLITE_MAGIC):
            raise HistoryError(f"{self.path}: not an SQLite database (first bytes {head[:16]!r}); "
                               "it was left untouched: move it away or point --history elsewhere")

    def _open_schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app != APPLICATION_ID and (tables or version):
            raise HistoryError(f"{self.path}: an SQLite database of another application (application_id "
                               f"{app:#x}, tables {sorted(tables)}); it was left untouched")
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{self.path}: history schema version {version} is newer than this tool's "
                               f"{SCHEMA_VERSION}; update zoo-conformance to read it")
        integrity = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            raise HistoryError(f"{self.path}: damaged history database ({integrity}); it was left untouched")
        mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise HistoryError(f"{self.path}: could not switch to WAL mode (journal mode {mode})")
        self.db.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated between our read and the lock.
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                for statement in filter(str.strip, MIGRATIONS[step].split(";")):
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _close_quietly(self) -> None:
        try:
            self.db.close()
        except Exception:  # noqa: BLE001 - already reporting the real problem
            pass

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # -- writing ---------------------------------------------------------------------------------
    def write_run(self, run: RunRecord) -> bool:
        """Append ``run`` in one transaction (whole or absent, even if the process is killed);
        False when a run with its id is already stored (a merge that meets it again)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run.run_id,)).fetchone():
                db.execute("ROLLBACK")
                return False
            db.execute(
                "INSERT INTO runs (run_id, started, finished, exit_status, host, host_class, versions, commit_sha,"
                " environment, session_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.started, run.finished, run.exit_status, run.host, run.host_class, run.versions,
                 run.environment.get("commit"), json.dumps(run.environment, sort_keys=True, default=str), run.session))
            rid = run.run_id
            db.executemany("INSERT OR REPLACE INTO cells (run_id, model, gate, case_id, backend, outcome, detail, text)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(rid, *c.key, c.outcome, c.detail, c.text) for c in run.cells])
            db.executemany("INSERT OR REPLACE INTO figures VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(rid, *c.key, name, finite_or_none(v)) for c in run.cells for name, v in c.figures.items()])
            db.executemany("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(rid, *c.key, name, json.dumps([finite_or_none(x) for x in values]))
                            for c in run.cells for name, values in c.series.items()])
            db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(rid, *s[:5], finite_or_none(s[5])) for s in run.samples])
            db.executemany("INSERT OR REPLACE INTO pictures VALUES (?, ?, ?, ?, ?, ?)",
                           [(rid, *p) for p in run.pictures])
            db.execute("DELETE FROM pictures WHERE run_id NOT IN "
                       f"(SELECT run_id FROM runs ORDER BY started DESC LIMIT {KEEP_PICTURES_RUNS})")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return True

    # -- reading ---------------------------------------------------------------------------------
    def run_ids(self, *, host_class: str | None = None, versions: str | None = None,
                before: float | None = None, limit: int | None = None,
                holding: Iterable[tuple[str, str]] | None = None) -> list[str]:
        """Run ids, newest first, optionally of one host class and version set, started before a
        time, holding a cell of one of the (model, gate) pairs ``holding``."""
        where, args = [], []
        for column, value in (("host_class", host_class), ("versions", versions)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            where.append("started < ?")
            args.append(before)
        if holding is not None:
            pairs = sorted(set(holding))
            if not pairs:
                return []
            where.append("EXISTS (SELECT 1 FROM cells WHERE cells.run_id = runs.run_id AND (cells.model, cells.gate) IN "
                         f"(VALUES {', '.join(['(?, ?)'] * len(pairs))}))")
            args += [x for pair in pairs for x in pair]
        sql = "SELECT run_id FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY started DESC, run_id DESC" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return [r[0] for r in self.db.execute(sql, args)]

    def load_run(self, run_id: str, *, pictures: bool = True) -> RunRecord:
        row = self.db.execute("SELECT started, finished, exit_status, environment, session_id FROM runs WHERE run_id = ?",
                              (run_id,)).fetchone()
        if row is None:
            raise HistoryError(f"{self.path}: no run {run_id!r}")
        run = RunRecord(run_id, row[0], row[1], row[2], json.loads(row[3] or "{}"), session_id=row[4])
        cells: dict[tuple, CellRecord] = {}
        for model, gate, case, backend, outcome, detail, text in self.db.execute(
                "SELECT model, gate, case_id, backend, outcome, detail, text FROM cells WHERE run_id = ?", (run_id,)):
            cells[(model, gate, case, backend)] = CellRecord(model, gate, case, backend, outcome, detail, text=text)
        for *key, name, value in self.db.execute(
                "SELECT model, gate, case_id, backend, name, value FROM figures WHERE run_id = ?", (run_id,)):
            cells[tuple(key)].figures[name] = value
        for *key, name, values in self.db.execute(
                'SELECT model, gate, case_id, backend, name, "values" FROM series WHERE run_id = ?', (run_id,)):
            cells[tuple(key)].series[name] = json.loads(values)
        run.cells = list(cells.values())
        run.samples = [tuple(r) for r in self.db.execute(
            "SELECT model, gate, backend, sample, name, value FROM samples WHERE run_id = ?", (run_id,))]
        if pictures:
            run.pictures = [tuple(r) for r in self.db.execute(
                "SELECT model, gate, backend, caption, png FROM pictures WHERE run_id = ?", (run_id,))]
        return run

    def runs(self, run_ids: Iterable[str], *, pictures: bool = False) -> Iterator[RunRecord]:
        for run_id in run_ids:
            yield self.load_run(run_id, pictures=pictures)

    def session_run_ids(self, run_id: str) -> list[str]:
        """Every pass of the session ``run_id`` belongs to, on its host, oldest first (itself alone
        when it has none)."""
        return [r[0] for r in self.db.execute(
            "SELECT other.run_id FROM runs AS this JOIN runs AS other"
            " ON other.session_id = this.session_id AND other.host = this.host"
            " WHERE this.run_id = ? ORDER BY other.started, other.run_id", (run_id,))]

    def newest_with(self, table: str, model: str, run_ids: Iterable[str]) -> str | None:
        """The newest of ``run_ids`` with rows of ``model`` in ``samples`` or ``pictures``."""
        assert table in ("samples", "pictures")
        for run_id in run_ids:
            if self.db.execute(f"SELECT 1 FROM {table} WHERE run_id = ? AND model = ? LIMIT 1", (run_id, model)).fetchone():
                return run_id
        return None

    def count_runs(self) -> int:
        return self.db.execute("SELECT count(*) FROM runs").fetchone()[0]

    # -- merging ---------------------------------------------------------------------------------
    def merge_from(self, other: "History") -> tuple[int, int]:
        """Copy every run of ``other`` that this history lacks: (runs added, runs already here)."""
        added = present = 0
        for run_id in sorted(other.run_ids()):
            if self.write_run(other.load_run(run_id)):
                added += 1
            else:
                present += 1
        return added, present
