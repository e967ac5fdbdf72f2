"""Running external tools (git, ATC, npu-smi, nvidia-smi) with a deadline.

A tool that hangs (a git fetch on a dead network, ATC waiting on a license server, npu-smi on a
wedged driver) must fail the test that needed it, with a message, instead of stalling the night.
Each call site passes a timeout sized for its tool; on expiry the tool's whole process group is
killed (git and ATC start helpers that would otherwise hold the pipes open) and ``ToolTimeout``
names the command and the limit.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Sequence


class ToolTimeout(RuntimeError):
    """An external tool ran past its deadline and was killed."""


def run_tool(
    argv: Sequence[str | os.PathLike], *, timeout_s: float, cwd: Path | str | None = None, merge_stderr: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion, capturing text output, or kill it after ``timeout_s`` seconds.
    ``merge_stderr``: one stream in the order the tool wrote it (stdout), as ATC's log reads best."""
    argv = [str(a) for a in argv]
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    with subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True, errors="replace",
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise ToolTimeout(
                f"{shlex.join(argv)} did not finish within {timeout_s:g} s and was killed (hung?)"
            ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err or "")
