"""A build lease that holds across hosts sharing one cache directory.

A file lock says nothing once several hosts share a filesystem: NFS may not honour it, and a pid
means nothing on another host. So who builds an artifact is also recorded in a lease, a small
file next to the artifact, kept alive by a heartbeat. Another process waiting for the lease takes
it over only once it has watched that heartbeat stand still for the lease timeout (measured on its
own clock, so clock skew between hosts does not matter), or at once when the holder ran on this
very host and its pid is gone; each takeover is printed and returned, so the build list can say so.

Leases are numbered generations, ``<target>.lease-<n>``, each created exclusively (``O_EXCL``,
atomic on NFS too). The newest generation is the lease; a process holds it once it has created
generation n+1 over a released or dead generation n and then sees no higher one. A holder that
finds a newer generation while beating has lost its lease (it had stalled past the timeout) and
says so; the cache's staging-then-rename keeps the artifact whole either way.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tooling.envvars import positive_from_env

HOST_ENV = "ZOO_HOST"  # this host's name in leases (default: the hostname); a loopback fleet sets one per server
LEASE_TIMEOUT_ENV = "ZOO_LEASE_TIMEOUT"
DEFAULT_LEASE_TIMEOUT_S = 120.0  # a live holder beats every quarter of this; NFS attribute caches lag ~60 s at most
MAX_BEAT_S = 10.0


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` if unset)."""
    return positive_from_env(name, default, "seconds")


def lease_timeout_s() -> float:
    return seconds_from_env(LEASE_TIMEOUT_ENV, DEFAULT_LEASE_TIMEOUT_S)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LeaseOwner:
    """What a lease file says: who holds it, for what, and its heartbeat."""

    generation: int
    host: str
    pid: int
    what: str
    since: float
    beat: int

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {since} ({self.what})"


class Lease:
    """The lease named ``base`` (a path; generations live next to it as ``<base>-<n>``)."""

    def __init__(self, base: Path, what: str, timeout_s: float | None = None):
        self.base = Path(base)
        self.what = what
        self.timeout_s = lease_timeout_s() if timeout_s is None else timeout_s
        self.generation: int | None = None
        self.takeovers: list[str] = []  # one line per dead holder this process displaced
        self.lost: str | None = None  # set by the heartbeat when a newer generation appeared
        self._watched: tuple[int, str] | None = None  # (generation, content) as last seen by a waiter
        self._watched_since = 0.0
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._pattern = re.compile(re.escape(self.base.name) + r"-(\d+)$")
        self._since = 0.0
        self._beat_count = 0

    # -- reading --------------------------------------------------------------------------------
    def _generations(self) -> dict[int, Path]:
        found = {}
        for path in self.base.parent.glob(f"{self.base.name}-*"):
            match = self._pattern.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def _path(self, generation: int) -> Path:
        return self.base.with_name(f"{self.base.name}-{generation}")

    @staticmethod
    def _read(path: Path) -> tuple[str, LeaseOwner | None]:
        """The raw content (what a waiter watches for change) and the owner it names, if readable."""
        try:
            raw = path.read_text()
        except OSError:
            return "", None
        try:
            info = json.loads(raw)
            generation = int(path.name.rsplit("-", 1)[1])
            return raw, LeaseOwner(generation, str(info["host"]), int(info["pid"]), str(info["what"]),
                                   float(info["since"]), int(info["beat"]))
        except (ValueError, KeyError, TypeError):
            return raw, None  # being written: judged by whether it changes, like any other

    def holder(self) -> LeaseOwner | None:
        generations = self._generations()
        if not generations:
            return None
        return self._read(generations[max(generations)])[1]

    # -- acquiring ------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """One attempt: True when this process now holds the lease. A live holder's lease is left
        alone; a dead one's (no heartbeat for the timeout, or its pid gone on this host) is taken
        over, and the takeover printed and recorded."""
        generations = self._generations()
        top = max(generations, default=0)
        takeover = None
        if top:
            raw, owner = self._read(generations[top])
            if raw:  # an empty read: released (deleted) between listing and reading
                dead = self._dead(top, raw, owner)
                if dead is None:
                    return False
                takeover = dead
        mine = top + 1
        path = self._path(mine)
        self._since, self._beat_count = time.time(), 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False  # another waiter won this generation
        with os.fdopen(fd, "w") as handle:
            handle.write(self._content())
        newer = [g for g in self._generations() if g > mine]
        if newer:  # a waiter that listed later moved past us: it holds the lease
            path.unlink(missing_ok=True)
            return False
        for generation, old in self._generations().items():
            if generation < mine:
                old.unlink(missing_ok=True)
        self.generation = mine
        if takeover:
            self.takeovers.append(takeover)
            print(f"zoo: {takeover}", file=sys.stderr, flush=True)
        self._start_heartbeat()
        return True

    def _dead(self, generation: int, raw: str, owner: LeaseOwner | None) -> str | None:
        """Why the holder of ``generation`` is presumed dead (a takeover line), or None while alive."""
        now = time.monotonic()
        if owner is not None and owner.host == host_name() and not _pid_alive(owner.pid):
            return f"took over the lease {self.base.name} ({owner.what}) from {owner.describe()}: that pid is gone"
        if self._watched != (generation, raw):
            self._watched, self._watched_since = (generation, raw), now
            return None
        still = now - self._watched_since
        if still < self.timeout_s:
            return None
        who = owner.describe() if owner else "a holder that never finished writing its lease"
        return (f"took over the lease {self.base.name} to {self.what} from {who}: no heartbeat for {still:.0f} s "
                f"({LEASE_TIMEOUT_ENV}={self.timeout_s:g}), its host is presumed dead")

    def waiting_for(self) -> str:
        owner = self.holder()
        if owner is None:
            return "a holder that has not said who it is"
        if self._watched and self._watched[0] == owner.generation:
            quiet = time.monotonic() - self._watched_since
            if quiet >= min(MAX_BEAT_S, self.timeout_s / 4) * 2:
                return f"{owner.describe()}, no heartbeat for {quiet:.0f} s of {self.timeout_s:g}"
        return owner.describe()

    # -- holding --------------------------------------------------------------------------------
    def _content(self) -> str:
        return json.dumps({"host": host_name(), "pid": os.getpid(), "what": self.what,
                           "since": self._since, "beat": self._beat_count})

    def _start_heartbeat(self) -> None:
        interval = min(MAX_BEAT_S, self.timeout_s / 4)
        self._stop.clear()
        self._beater = threading.Thread(target=self._heartbeat, args=(interval,), daemon=True,
                                        name=f"lease heartbeat {self.base.name}")
        self._beater.start()

    def _heartbeat(self, interval: float) -> None:
        path = self._path(self.generation)
        while not self._stop.wait(interval):
            newer = [g for g in self._generations() if g > self.generation]
            if newer or not path.exists():
                self.lost = (f"lease {path.name} lost while building ({self.what}): generation {max(newer)} took it "
                             f"over" if newer else f"lease {path.name} was removed while building ({self.what})")
                print(f"zoo: {self.lost}", file=sys.stderr, flush=True)
                return
            self._beat_count += 1
            scratch = path.with_name(f".{path.name}.beat")
            scratch.write_text(self._content())
            os.replace(scratch, path)

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None
        if self.generation is not None and self.lost is None:
            self._path(self.generation).unlink(missing_ok=True)
        self.generation = None
