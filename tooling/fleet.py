"""Several hosts, one run: what each host of a pytest-xdist fleet must share with the controller.

A fleet is pytest-xdist with execnet gateways to other hosts (``--tx socket=HOST:PORT``, or
``--tx ssh=HOST``). xdist's rsync is deprecated, so each host brings its own checkout, venv and
staged data; a host whose checkout, venv or staged data differ from the controller's would give
verdicts about something else, so the controller asks each new gateway for its identity before a
worker starts there and refuses the host that differs, saying what differs.

This module runs on both sides: imported by the plugin on the controller, and sent whole through
``gateway.remote_exec`` to each host (so it uses the standard library only), where it answers the
controller's request on its channel.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

IDENTITY_TIMEOUT_S = 120.0  # listing a staged COCO or Sintel tree on a slow NFS mount


def _git(root: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tree_listing(root: str | None) -> str:
    """A digest of every file's relative path and size below a staged root (or why there is none).
    Sizes, not contents: the check runs at every start on every host; scores fingerprint contents."""
    if not root:
        return "not given"
    path = Path(root)
    if not path.is_dir():
        return "absent"
    entries = []
    for folder, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            file = Path(folder) / name
            try:
                entries.append(f"{file.relative_to(path).as_posix()}\t{file.stat().st_size}")
            except OSError:
                entries.append(f"{file.relative_to(path).as_posix()}\tunreadable")
    return f"{len(entries)} files, {_digest(chr(10).join(entries).encode())}"


def resolve_roots(given: dict[str, tuple[str | None, str]]) -> dict[str, str | None]:
    """Each root as this host resolves it: the command line's value (the controller passes it to
    every worker) or else this host's environment variable."""
    return {name: value or os.environ.get(env) for name, (value, env) in given.items()}


def _cache_marker(cache_dir: str | None, marker: str) -> str:
    """Whether this host sees the controller's marker file in the cache: one cache for the fleet."""
    if not cache_dir:
        return "no cache dir"
    return "shared" if (Path(cache_dir) / marker).is_file() else f"{cache_dir} lacks the controller's {marker}"


def host_identity(checkout: str | os.PathLike, roots: dict[str, str | None], marker: str) -> dict[str, str]:
    """What must match across the fleet: the checkout's commit and uncommitted changes to tracked
    files, the Python and every installed distribution's version, each staged root's listing, and
    the artifact cache (the controller's ``marker`` file must be visible in it)."""
    root = Path(checkout)
    commit = _git(root, "rev-parse", "HEAD")
    changes = _git(root, "diff", "HEAD", "--binary")
    packages = sorted(f"{d.metadata['Name']}=={d.version}".lower() for d in metadata.distributions()
                      if d.metadata["Name"])
    identity = {
        "commit": commit.decode().strip() if commit else "not a git checkout",
        "uncommitted changes": "none" if changes == b"" else _digest(changes) if changes else "unknown",
        "python": sys.version.split()[0],
        "venv packages": f"{len(packages)} packages, {_digest(chr(10).join(packages).encode())}",
    }
    identity.update({f"staged {name}": _tree_listing(value) for name, value in sorted(roots.items())
                     if name != "cache_dir"})
    identity["artifact cache"] = _cache_marker(roots.get("cache_dir"), marker)
    return identity


def differences(controller: dict[str, str], host: dict[str, str]) -> list[str]:
    """Each way ``host`` differs from ``controller``, as ``what: host's vs controller's``."""
    return [f"{key}: {host.get(key, 'missing')} vs controller's {value}"
            for key, value in controller.items() if host.get(key) != value]


def remote_identity(gateway, roots: dict[str, tuple[str | None, str]], marker: str,
                    timeout_s: float = IDENTITY_TIMEOUT_S) -> dict[str, str]:
    """Ask the host behind an execnet ``gateway`` for its identity, computed in its working
    directory (where its worker will run) with its own environment."""
    import tooling.fleet as this

    channel = gateway.remote_exec(this)
    channel.send(json.dumps({"roots": roots, "marker": marker}))
    try:
        return json.loads(channel.receive(timeout=timeout_s))
    finally:
        channel.close()


def fleet_gateway_alive(gateway, timeout_s: float = 10.0) -> bool:
    """Whether the host behind ``gateway`` still answers (a dead socket refuses at once)."""
    try:
        channel = gateway.remote_exec("channel.send(1)")
        return channel.receive(timeout=timeout_s) == 1
    except Exception:  # noqa: BLE001 - execnet raises OSError, EOFError, RemoteError or TimeoutError
        return False


def _answer(channel) -> None:
    request = json.loads(channel.receive())
    roots = resolve_roots(request["roots"])
    roots["cache_dir"] = roots.get("cache_dir") or os.path.join(os.getcwd(), ".zoo-cache")  # the default
    channel.send(json.dumps(host_identity(os.getcwd(), roots, request["marker"])))


if __name__ == "__channelexec__":  # on a fleet host: answer the controller's one request
    _answer(channel)  # type: ignore[name-defined]  # noqa: F821


class Fleet:
    """The controller's side: its own identity, the marker in the shared cache, and each host's check."""

    def __init__(self, checkout: Path, roots: dict[str, tuple[str | None, str]], cache_dir: Path, run_id: str):
        self.roots = roots
        self.marker = f"fleet-{run_id}.controller"
        self.marker_path = Path(cache_dir) / self.marker
        self.marker_path.parent.mkdir(parents=True, exist_ok=True)
        self.marker_path.write_text(json.dumps({"pid": os.getpid()}))
        resolved = {**resolve_roots(roots), "cache_dir": str(cache_dir)}
        self.identity = host_identity(checkout, resolved, self.marker)
        self.hosts: dict[str, dict[str, str]] = {}

    def check(self, gateway) -> list[str]:
        """The differences of the host behind ``gateway`` (empty: it may run tests)."""
        identity = remote_identity(gateway, self.roots, self.marker)
        self.hosts[str(gateway.spec)] = identity
        return differences(self.identity, identity)

    def close(self) -> None:
        self.marker_path.unlink(missing_ok=True)
