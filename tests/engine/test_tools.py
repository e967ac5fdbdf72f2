"""External tools run with a deadline: a hung git, ATC or npu-smi fails with a message."""
from __future__ import annotations

import stat

import pytest

from tooling import sources
from tooling.backends.base import BackendError
from tooling.backends import atc as atc_module
from tooling.backends.npu import probe_npus
from tooling.tools import ToolTimeout, run_tool


def hanging_tool(tmp_path, name: str):
    """An executable that starts a helper process and waits, as a stuck git or ATC would."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\nsleep 60 &\nsleep 60\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_output_and_exit_status_come_back():
    done = run_tool(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_s=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    merged = run_tool(["sh", "-c", "echo a; echo b >&2"], timeout_s=30, merge_stderr=True)
    assert merged.stdout == "a\nb\n"


def test_a_hung_tool_and_its_helpers_are_killed_with_a_message(tmp_path):
    tool = hanging_tool(tmp_path, "stuck")
    with pytest.raises(ToolTimeout, match=r"stuck did not finish within 0.5 s and was killed"):
        run_tool([tool], timeout_s=0.5)


def test_a_hung_git_fails_as_an_upstream_error(tmp_path, monkeypatch):
    hanging_tool(tmp_path, "git")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(sources, "GIT_TIMEOUT_S", 0.5)
    with pytest.raises(sources.UpstreamError, match=r"git fetch origin did not finish within 0.5 s"):
        sources._git("fetch", "origin", cwd=tmp_path)


def test_a_hung_atc_fails_the_compile_with_the_command(tmp_path, monkeypatch):
    atc = hanging_tool(tmp_path, "atc")
    monkeypatch.setattr(atc_module, "ATC_TIMEOUT_S", 0.5)
    with pytest.raises(BackendError, match=r"ATC for toy-b1: .*atc --framework=5 did not finish within 0.5 s"):
        atc_module.run_atc(str(atc), ["atc", "--framework=5"], tmp_path, "toy-b1")


def test_a_hung_npu_smi_leaves_the_om_backend_unavailable_with_the_reason(tmp_path, monkeypatch):
    hanging_tool(tmp_path, "npu-smi")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    chips, reason = probe_npus(timeout_s=0.5)
    assert chips == [] and "npu-smi info did not finish within 0.5 s" in reason
