"""Bad command-line options are usage errors at start, not a wrong or silent run; command-line
tools report a damaged input file by name; a run's summary lists the artifacts it rebuilt."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _pytest.config.argparsing import Parser

from tooling import cli, pytest_plugin
from tooling.cache import ArtifactCache, ArtifactKey

PROJECT = Path(__file__).resolve().parents[2]


def _parse(*args: str):
    parser = Parser(_ispytest=True)
    pytest_plugin.pytest_addoption(parser)
    return parser.parse(list(args))


@pytest.mark.parametrize(("args", "message"), [
    (("--backends", "onnx"), "'onnx' is a reference every case runs anyway, not a deployed backend"),
    (("--backends", "nosuch"), "unknown backend 'nosuch'"),
    (("--backends", "onnxruntime,"), "has an empty entry"),
    (("--accuracy-backend", "onnx"), "'onnx' is a reference"),
    (("--accuracy-backend", "onnxruntime,openvino"), "name one backend, torch or all"),
    (("--threads", "0"), "--threads: 0 must be at least 1"),
    (("--threads", "two"), "--threads: 'two' is not a whole number"),
    (("--accuracy-limit", "-1"), "--accuracy-limit: -1 must be at least 1"),
    (("--accuracy-limit", "0"), "--accuracy-limit: 0 must be at least 1"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_bad_option_is_a_usage_error(args, message):
    with pytest.raises(pytest.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parse(*args)


def test_good_options_parse():
    options = _parse("--backends", "onnxruntime,openvino", "--threads", "2", "--accuracy-limit", "5")
    assert (options.backends, options.threads, options.accuracy_limit) == ("onnxruntime,openvino", 2, 5)
    assert [_parse("--accuracy-backend", name).accuracy_backend for name in ("torch", "all", "openvino")] == [
        "torch", "all", "openvino"]


def _run_pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tooling.pytest_plugin", "-q", *args],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(PROJECT)})


REBUILDING_TESTS = '''
import os
from pathlib import Path

import pytest

from tooling.cache import ArtifactKey

def build(staging):
    with open(os.environ["PROBE_BUILD_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")
    (staging / "model.onnx").write_bytes(b"graph")

@pytest.mark.parametrize("worker", range(4))
def test_uses_the_same_artifact(zoo, worker):
    zoo.cache.get(ArtifactKey("onnx", "probe", "net", "net-1x3", {"w": 1}), build)
'''


def test_rebuild_under_xdist_builds_once_and_the_summary_lists_it(tmp_path, monkeypatch):
    """Two workers, four tests asking for one artifact, --rebuild: one build, reported once."""
    test_file = tmp_path / "test_probe_run.py"
    test_file.write_text(REBUILDING_TESTS)
    cache, builds = tmp_path / "cache", tmp_path / "builds.txt"
    monkeypatch.setenv("PROBE_BUILD_LOG", str(builds))
    ArtifactCache(cache).get(ArtifactKey("onnx", "probe", "net", "net-1x3", {"w": 1}),
                             lambda staging: (staging / "model.onnx").write_bytes(b"old graph"))
    rebuilt = _run_pytest(str(test_file), "--cache-dir", str(cache), "--zoo-report", str(tmp_path / "report.json"),
                          "-n", "2", "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert len(builds.read_text().splitlines()) == 1, "each worker rebuilt the artifact"
    assert "artifacts built in this run" in rebuilt.stdout
    assert rebuilt.stdout.count("onnx/probe/net-1x3-") == 1 and "forced rebuild (--rebuild)" in rebuilt.stdout


def test_impossible_cache_dir_is_one_usage_error_at_start(tmp_path):
    test_file = tmp_path / "test_probe_run.py"
    test_file.write_text(REBUILDING_TESTS)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = _run_pytest(str(test_file), "-p", "no:xdist", "--cache-dir", str(blocker / "cache"))
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR, bad.stdout + bad.stderr
    assert f"--cache-dir: cache dir {blocker / 'cache'}: cannot be created" in bad.stderr
    assert bad.stderr.count("cannot be created") == 1  # one error at start, not one per test


@pytest.mark.parametrize("damage", ["truncated", "flipped", "text"])
def test_verify_golden_names_a_damaged_golden(tmp_path, capsys, damage):
    source = PROJECT / "fixtures" / "videopose3d" / "golden" / "vp3d_public.npz"
    path = tmp_path / "vp3d_public.npz"
    data = source.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) * 6 // 10])
    elif damage == "flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 4]) + data[middle + 4:])
    else:
        path.write_text(json.dumps({"2d_poses": [1, 2]}))
    assert cli.main(["verify-golden", "videopose3d", "vp3d", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and "Traceback" not in err
