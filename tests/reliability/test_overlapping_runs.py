"""Runs that overlap on one cache: a quick look started while the nightly scores the same set.

Both passes run in real, separate processes through the engine's staged-data path, on
VideoPose3D's known-answer set with the network replaced by its oracle. The "nightly" oracle
pauses after its third call until the test lets it go, so the second process certainly runs while
the first one is in the middle of writing records. The second
process asks for ``--restart-accuracy``, the worst case: it must neither crash the first pass nor
delete a record of it, and both must end with the figures of a lone run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tooling.accuracy import run_accuracy
from tooling.locations import Roots
from tooling.models.videopose3d.network import ONE_SIDED_PAD
from tooling.models.videopose3d.slice import write_known_answer
from tooling.progress import ResultStore, owned_run
from tooling.workspace import Options, Workspace

PROJECT = Path(__file__).resolve().parents[2]

SCORE = """
import json, sys, time
from pathlib import Path
import numpy as np
from tooling.accuracy import run_accuracy
from tooling.locations import Roots
from tooling.models.videopose3d.network import ONE_SIDED_PAD
from tooling.workspace import Options, Workspace

data, weights, cache, restart, gate, out = sys.argv[1:]
calls = []

def oracle(feeds):
    calls.append(1)
    if gate and len(calls) == 3:
        deadline = time.monotonic() + 180
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    poses = feeds["2d_poses"][:, ONE_SIDED_PAD:-ONE_SIDED_PAD]
    return {"3d_preds": np.concatenate([poses, np.zeros_like(poses[..., :1])], axis=-1)}

workspace = Workspace(Roots(Path(data), Path(weights), None, Path(cache)), Options(restart_accuracy=restart == "1"))
metrics = run_accuracy(workspace.model("videopose3d"), "onnxruntime", profile="smoke", oracles={"vp3d": oracle})
Path(out).write_text(json.dumps(metrics))
"""


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory):
    return write_known_answer(tmp_path_factory.mktemp("vp3d"))


def _start(answer, cache: Path, out: Path, restart: bool, gate: Path | None = None) -> subprocess.Popen:
    script = out.with_suffix(".py")
    script.write_text(SCORE)
    return subprocess.Popen(
        [sys.executable, str(script), str(answer.data_root), str(answer.weights_root), str(cache),
         "1" if restart else "0", str(gate or ""), str(out)],
        cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _score_here(answer, cache: Path) -> dict:
    """A lone run, in this process, through the same engine path as the script."""
    def oracle(feeds):
        poses = feeds["2d_poses"][:, ONE_SIDED_PAD:-ONE_SIDED_PAD]
        return {"3d_preds": np.concatenate([poses, np.zeros_like(poses[..., :1])], axis=-1)}

    workspace = Workspace(Roots(answer.data_root, answer.weights_root, None, cache), Options())
    metrics = run_accuracy(workspace.model("videopose3d"), "onnxruntime", profile="smoke", oracles={"vp3d": oracle})
    return json.loads(json.dumps(metrics))  # as the script hands them over


def _finish(process: subprocess.Popen, out: Path, timeout: float = 240) -> tuple[dict, str]:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text()), stderr


def _records(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    [records] = [p for p in (cache / "runs" / "videopose3d").glob("*/records")]
    out = {}
    for path in sorted(records.glob("*.npz")):
        with np.load(path) as data:
            out[path.name] = {k: data[k] for k in data.files}
    return out


def test_a_restarting_run_overlapping_the_nightly_loses_nothing(known_answer, tmp_path):
    lone = _score_here(known_answer, tmp_path / "lone")
    lone_records = _records(tmp_path / "lone")

    shared = tmp_path / "shared"
    gate = tmp_path / "go"
    nightly = _start(known_answer, shared, tmp_path / "nightly.json", False, gate)
    deadline = time.monotonic() + 120
    while not list(shared.glob("runs/videopose3d/*/records/*.npz")):
        assert nightly.poll() is None, nightly.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the nightly pass wrote no record in 120 s"
        time.sleep(0.1)
    look, look_stderr = _finish(_start(known_answer, shared, tmp_path / "look.json", True), tmp_path / "look.json")
    assert nightly.poll() is None, "the nightly pass ended before the quick look did"
    gate.touch()
    assert "is being scored by" in look_stderr and f"pid {nightly.pid}" in look_stderr, look_stderr
    nightly_metrics, _ = _finish(nightly, tmp_path / "nightly.json")

    assert look == lone and nightly_metrics == lone
    records = _records(shared)
    assert records.keys() == lone_records.keys()  # every record there, none half-written
    for name, arrays in lone_records.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(records[name][key], value, err_msg=name)
    leftovers = [p.name for p in (shared / "runs" / "videopose3d").iterdir() if p.is_dir() and "-" in p.name]
    assert not leftovers, f"the second pass left its private folder behind: {leftovers}"


def test_owned_run_names_the_holder_and_leaves_its_records_alone(tmp_path):
    """The lock API itself, across two processes: the second one gets a private folder."""
    run_dir = tmp_path / "runs" / "toy" / "abc"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from tooling.progress import owned_run, ResultStore\n"
         f"with owned_run(Path({str(run_dir)!r}), 'score toy on onnxruntime') as folder:\n"
         "    store = ResultStore(folder / 'records', {'v': 1}); store.save('a', {'x': __import__('numpy').ones(2)})\n"
         "    print('held', flush=True); sys.stdin.readline()\n"],
        cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with owned_run(run_dir, "quick look") as folder:
            assert folder != run_dir and folder.parent == run_dir.parent
            ResultStore(folder / "records", {"v": 1}, restart=True).save("a", {"x": np.zeros(2)})
        assert not folder.exists()
        assert len(list((run_dir / "records").glob("*.npz"))) == 1  # the holder's record untouched
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    with owned_run(run_dir, "nightly again") as folder:  # free again: the shared folder, resumed
        assert folder == run_dir and ResultStore(folder / "records", {"v": 1}).resumed == 1
