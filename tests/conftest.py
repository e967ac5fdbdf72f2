"""Fixtures shared by the project's own tests."""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from typing import Callable

import pytest


def commit_files(repo: Path, files: dict[str, str]) -> str:
    """Write ``files`` (relative path -> text, dedented) into a new git repository at ``repo``,
    commit them and return the commit: a generated stand-in for an upstream repository."""
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(textwrap.dedent(text))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(repo), "PATH": "/usr/bin:/bin"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pinned"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(name="commit_files")
def commit_files_fixture() -> Callable[[Path, dict[str, str]], str]:
    return commit_files
