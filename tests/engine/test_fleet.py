"""Several hosts, one run, simulated on loopback: execnet socket servers on 127.0.0.1, each started
by the test in its own working copy (a git worktree of this checkout at the same commit, with the
same uncommitted changes), with its own HOME, TMPDIR and host name, all sharing one artifact cache.
The controller reaches each server as a proxy gateway and runs a worker there (``--px
id=hX//socket=127.0.0.1:PORT --tx popen//via=hX``, the fleet recipe of docs/nightly.md). A toy
model with a sharded accuracy pass keeps it small; every server is stopped by the test, with
bounded waits everywhere. Nightly tier: a few worker start-ups cost more than the CPU tier allows.
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import execnet
import pytest

from tooling.model_spec import PROJECT_ROOT

pytestmark = pytest.mark.slow

SOCKET_SERVER = Path(execnet.__file__).parent / "script" / "socketserver.py"
RUN_TIMEOUT_S = 240
START_TIMEOUT_S = 30

# The engine tests' toy network, slice and yaml (tests/engine/conftest.py); here its pass is split into samples (one per
# image) and merged, so it can be sharded, and each sample can be held while a host is killed.
TOY = runpy.run_path(str(Path(__file__).with_name("conftest.py")))
YAML = TOY["TOY_YAML"]
SLICE = TOY["TOY_SLICE"] + '''
import os
import time
from pathlib import Path

from tooling.slice import PassSample


def _hold():
    """While the test's hold file exists, a sample's scoring stops here (so a host can be killed
    mid-pass), after saying which host it runs on."""
    hold = Path(os.environ["TOY_HOLD"])
    if hold.exists():
        (hold.parent / f"started-{os.environ['ZOO_HOST']}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class ToyShardSlice(ToySlice):
    accuracy_unit = "images"
    evaluate = ModelSlice.evaluate  # samples, then their merge

    def accuracy_samples(self, ctx):
        count = len(np.load(ctx.data_paths["toy/images.npy"]))
        return [PassSample(f"image-{i}", i) for i in range(count)][: ctx.limit]

    def score_sample(self, ctx, sample, advance):
        _hold()
        image = np.load(ctx.data_paths["toy/images.npy"])[sample.item : sample.item + 1]
        return {"peak": np.float64(ctx.run("doubler", {"x": image})["y"].max())}

    def merge_records(self, ctx, samples, records):
        return {"mean_peak": float(np.mean([r["peak"] for r in records]))}


SLICE = ToyShardSlice()
'''

TEST_MODULE = '''
from tooling.conformance import ConformanceSuite


class TestToy(ConformanceSuite):
    model = "toynet"
'''


def _git(*args: str, cwd: Path = PROJECT_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=120).stdout.decode()


def _free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Host:
    name: str
    checkout: Path
    env: dict
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def gateway_id(self) -> str:
        return self.name.replace("-", "")

    def start(self) -> None:
        self.port = _free_port()
        log = open(self.checkout.parent / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(SOCKET_SERVER), f"127.0.0.1:{self.port}"], cwd=self.checkout, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with closing(socket.socket()) as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"socket server of {self.name} did not listen on port {self.port}")

    def kill(self) -> None:
        """The host dies: its server and the worker it spawned, at once."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)

    def tx(self) -> list[str]:
        return ["--px", f"id={self.gateway_id}//socket=127.0.0.1:{self.port}", "--tx", f"popen//via={self.gateway_id}"]


class Fleet:
    def __init__(self, root: Path, names: tuple[str, ...]):
        self.root = root
        self.cache = root / "cache"
        self.hold = root / "hold"
        self.staged = root / "staged"
        self.hosts: dict[str, Host] = {}
        changes = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=PROJECT_ROOT, capture_output=True,
                                 check=True, timeout=120).stdout
        for name in names:
            self.add_host(name, changes)

    def add_host(self, name: str, changes: bytes, commit: str = "HEAD") -> Host:
        checkout = self.root / name / "checkout"
        _git("worktree", "add", "--detach", str(checkout), commit)
        if changes:
            subprocess.run(["git", "apply", "--binary", "-"], cwd=checkout, input=changes, check=True, timeout=120)
        (checkout / ".venv").symlink_to(Path(sys.prefix))
        pyproject = checkout / "pyproject.toml"  # the toy model's marker, as its test module needs
        pyproject.write_text(pyproject.read_text().replace("markers = [", 'markers = [\n    "toynet: loopback fleet toy",', 1))
        (checkout / "toyslice.py").write_text(SLICE)
        (checkout / "fleet_toy" / "baselines").mkdir(parents=True)
        (checkout / "fleet_toy" / "baselines" / "toynet.yaml").write_text(YAML)
        (checkout / "fleet_toy" / "test_toynet.py").write_text(textwrap.dedent(TEST_MODULE))
        home, tmp = self.root / name / "home", self.root / name / "tmp"
        home.mkdir()
        tmp.mkdir()
        env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "ZOO_HOST": name, "TOY_HOLD": str(self.hold),
               "ZOO_BASELINES_DIR": str(checkout / "fleet_toy" / "baselines"), "ZOO_LEASE_TIMEOUT": "3"}
        for leaked in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID",
                       "PYTEST_CURRENT_TEST", "PYTHONPATH", "ZOO_CACHE_DIR"):
            env.pop(leaked, None)
        self.hosts[name] = host = Host(name, checkout, env)
        return host

    def stage(self) -> None:
        toy = runpy.run_path(str(self.hosts["host-a"].checkout / "toyslice.py"))
        toy["SLICE"].make_known_answer(self.staged)

    def run(self, *hosts: str, extra: tuple[str, ...] = (), cache: Path | None = None, single: bool = False,
            background: bool = False, name: str = "run"):
        """A pytest controller in host-a's working copy; ``python -c`` keeps its import path
        relative (''), so each worker imports its own working copy's ``tooling``."""
        controller = self.hosts["host-a"]
        junit = self.root / f"{name}.xml"
        args = [sys.executable, "-c", "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", "fleet_toy",
                "-p", "no:cacheprovider", "--backends", "onnxruntime",
                "-k", "test_accuracy_on_staged_dataset or test_onnx_matches_torch", "--accuracy-shards", "3",
                "--data-root", str(self.staged / "data"), "--weights-root", str(self.staged / "weights"),
                "--cache-dir", str(cache or self.cache), f"--junitxml={junit}", "-rP",
                f"--zoo-report={self.root / (name + '.json')}", *extra]
        if single:
            args += ["-p", "no:xdist"]
        else:
            args += ["--dist", "load", "--max-worker-restart", "0"]
            for host in hosts:
                args += self.hosts[host].tx()
        out = open(self.root / f"{name}.out", "w")
        process = subprocess.Popen(args, cwd=controller.checkout, env=controller.env, stdout=out,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out.close()
        if background:
            return process
        return self.finish(process, name)

    def finish(self, process: subprocess.Popen, name: str) -> tuple[int, str, dict[str, str]]:
        try:
            process.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        output = (self.root / f"{name}.out").read_text()
        return process.returncode, output, _outcomes(self.root / f"{name}.xml")

    def stop(self) -> None:
        for host in self.hosts.values():
            host.kill()
        for host in self.hosts.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(host.checkout)], cwd=PROJECT_ROOT,
                           capture_output=True, timeout=120)
        subprocess.run(["git", "worktree", "prune"], cwd=PROJECT_ROOT, capture_output=True, timeout=120)


def _outcomes(junit: Path) -> dict[str, str]:
    """Test name -> passed / failed / skipped / error, from a JUnit file (empty if none was written)."""
    if not junit.is_file():
        return {}
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    return outcomes


@pytest.fixture
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(root, ("host-a", "host-b", "host-c"))
    try:
        for host in fleet.hosts.values():
            host.start()
        fleet.stage()
        yield fleet
    finally:
        fleet.stop()


def _built(report: Path) -> list[str]:
    return [b["artifact"] for b in json.loads(report.read_text()).get("builds", [])]


def test_three_hosts_give_the_single_process_verdicts_and_build_each_artifact_once(fleet):
    code, output, verdicts = fleet.run("host-a", "host-b", "host-c", name="fleet")
    assert code == 0, output[-3000:]
    for host in ("hosta", "hostb", "hostc"):
        assert f"zoo fleet: host {host} matches the controller" in output
    single_code, single_output, single_verdicts = fleet.run(cache=fleet.root / "single-cache", single=True,
                                                            name="single")
    assert single_code == 0, single_output[-3000:]
    assert verdicts == single_verdicts and len(verdicts) == 6  # 3 shards, their merge, onnx-vs-torch b1 and b2
    assert set(verdicts.values()) == {"passed"}
    built = _built(fleet.root / "fleet.json")
    assert built and len(built) == len(set(built)), f"an artifact was built twice across the fleet: {built}"
    assert sorted(built) == sorted(_built(fleet.root / "single.json"))
    durations = json.loads((fleet.cache / "durations.json").read_text())
    assert any("shard1of3" in test for test in durations)  # the next run orders longest first


def test_a_host_at_another_commit_is_refused_by_name(fleet):
    other = fleet.add_host("host-d", b"", commit="HEAD~1")
    other.start()
    code, output, _ = fleet.run("host-a", "host-d", name="refused")
    assert code == pytest.ExitCode.USAGE_ERROR, output[-3000:]
    assert "zoo fleet: refusing host hostd: it differs from the controller: commit:" in output


def test_a_killed_host_leaves_its_test_crashed_and_a_rerun_takes_its_lease_over(fleet):
    fleet.hold.write_text("hold")
    process = fleet.run("host-a", "host-b", "host-c", background=True, name="killed")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        started = []
        while not started and time.monotonic() < deadline and process.poll() is None:
            started = sorted(fleet.root.glob("started-*"))
            time.sleep(0.1)
        assert started, (fleet.root / "killed.out").read_text()[-3000:]
        victim = started[0].name.removeprefix("started-")
        fleet.hosts[victim].kill()
    finally:
        fleet.hold.unlink()
    code, output, verdicts = fleet.finish(process, "killed")
    assert code != 0 and "crashed" in output, output[-3000:]
    crashed = [test for test, outcome in verdicts.items() if outcome in ("failure", "error")]
    assert any("shard" in test for test in crashed), verdicts
    survivors = [name for name in ("host-a", "host-b", "host-c") if name != victim]
    code, output, verdicts = fleet.run(*survivors, name="rerun")
    assert code == 0, output[-3000:]
    assert set(verdicts.values()) == {"passed"} and len(verdicts) == 6
    assert "took over the lease" in output and f"on {victim}" in output and "no heartbeat for" in output
