"""The fleet-wide build lease (tooling/lease.py): a live holder on another host keeps it, a dead
one's is taken over after the timeout (or at once when its pid is gone on this host), the takeover
is printed and reaches the build list."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tooling.cache import ArtifactCache, ArtifactKey, hold_lock, lease_of, lock_holder
from tooling.lease import HOST_ENV, LEASE_TIMEOUT_ENV, Lease

ROOT = Path(__file__).resolve().parents[2]
KEY = ArtifactKey("onnx", "m", "net", "net-1x3", {"dims": [1, 3]})

HOLDER = """
import sys, time
from pathlib import Path
from tooling.cache import hold_lock
with hold_lock(Path(sys.argv[1]), "build onnx artifact net-1x3 on the other host"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(lock: Path, host: str, timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, HOST_ENV: host, LEASE_TIMEOUT_ENV: str(timeout_s)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _poll(lease: Lease, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if lease.try_acquire():
            return True
        time.sleep(0.05)
    return False


def test_a_beating_lease_on_another_host_is_never_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv(HOST_ENV, "host-a")
    lock = tmp_path / "net.lock"
    holder = _holder(lock, "host-b", 0.4)  # beats every 0.1 s
    try:
        waiter = Lease(lease_of(lock), "build it on host-a", timeout_s=0.4)
        assert not _poll(waiter, 1.5)  # more than three timeouts: the heartbeat keeps it alive
        assert waiter.holder().host == "host-b" and "on host-b" in lock_holder(lock)
    finally:
        _kill(holder)


def test_a_dead_hosts_lease_is_taken_over_after_its_timeout_and_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(HOST_ENV, "host-a")
    lock = tmp_path / "net.lock"
    holder = _holder(lock, "host-b", 30.0)
    pid = holder.pid
    _kill(holder)  # its host "dies": the lease stays, its heartbeat stops
    waiter = Lease(lease_of(lock), "build it on host-a", timeout_s=0.5)
    first = waiter.try_acquire()  # the first look only starts the waiter's clock
    assert not first
    assert _poll(waiter, 5.0)
    try:
        (line,) = waiter.takeovers
        assert f"pid {pid} on host-b" in line and "no heartbeat for" in line and "presumed dead" in line
        assert line in capsys.readouterr().err
        assert waiter.holder().host == "host-a" and waiter.holder().pid == os.getpid()
        assert len(list(tmp_path.glob("net.lease-*"))) == 1  # the dead generation is gone
    finally:
        waiter.release()
    assert not list(tmp_path.glob("net.lease-*"))


def test_a_dead_pid_on_this_host_is_taken_over_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(HOST_ENV, "host-a")
    lock = tmp_path / "net.lock"
    holder = _holder(lock, "host-a", 3600.0)
    _kill(holder)
    waiter = Lease(lease_of(lock), "build it", timeout_s=3600.0)
    assert waiter.try_acquire()
    assert "that pid is gone" in waiter.takeovers[0]
    waiter.release()


def test_one_of_two_waiters_wins_a_dead_lease(tmp_path, monkeypatch):
    monkeypatch.setenv(HOST_ENV, "host-a")
    lock = tmp_path / "net.lock"
    _kill(_holder(lock, "host-b", 30.0))
    first, second = (Lease(lease_of(lock), f"waiter {i}", timeout_s=0.2) for i in (1, 2))
    for waiter in (first, second):
        assert not waiter.try_acquire()
    time.sleep(0.3)
    assert first.try_acquire()
    try:
        assert not second.try_acquire()  # the new generation is alive: its clock starts afresh
    finally:
        first.release()


def test_the_cache_build_list_names_the_takeover(tmp_path, monkeypatch):
    """A build whose host died mid-build (lease and staging left behind) is rebuilt once, by the
    first process whose wait outlasts the timeout, and its build log says whose lease it took."""
    monkeypatch.setenv(HOST_ENV, "host-a")
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, "0.5")
    cache = ArtifactCache(tmp_path)
    target = cache.directory(KEY)
    target.parent.mkdir(parents=True)
    holder = _holder(Path(str(target) + ".lock"), "host-b", 30.0)
    staging = Path(str(target) + ".tmp-deadbeef")
    staging.mkdir()
    _kill(holder)

    def build(stage: Path) -> None:
        (stage / "model.onnx").write_bytes(b"onnx")

    path = cache.get(KEY, build)
    assert (path / "model.onnx").read_bytes() == b"onnx" and not staging.exists()
    (entry,) = cache.rebuilds()
    assert entry.reason.startswith("not built; took over the lease") and "on host-b" in entry.reason


def test_lock_timeout_names_a_live_remote_holder(tmp_path, monkeypatch):
    monkeypatch.setenv(HOST_ENV, "host-a")
    lock = tmp_path / "net.lock"
    holder = _holder(lock, "host-b", 0.4)
    try:
        from tooling.cache import LockTimeout

        with pytest.raises(LockTimeout, match="on host-b"):
            with hold_lock(lock, "build it", timeout_s=0.8, notice_s=0.2):
                pass
    finally:
        _kill(holder)
