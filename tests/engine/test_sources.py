"""Upstream sources: pinned commit from a staged clone or mirror, patches and hooks applied once."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tooling.sources import MANIFEST, UpstreamError, UpstreamNotStaged, UpstreamSource


def git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture
def upstream_repo(tmp_path):
    """A two-commit repository whose first commit is the pinned one."""
    repo = tmp_path / "upstream" / "toymodel"
    (repo / "toypkg").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "toypkg" / "__init__.py").write_text("")
    (repo / "toypkg" / "layers.py").write_text("SCALE = 2\n\ndef forward(x):\n    return x * SCALE\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pinned")
    pinned = git(repo, "rev-parse", "HEAD")
    (repo / "toypkg" / "layers.py").write_text("SCALE = 100\n\ndef forward(x):\n    return x * SCALE\n")
    git(repo, "commit", "-qam", "later")
    return repo, pinned


@pytest.fixture
def patches(tmp_path, upstream_repo):
    repo, pinned = upstream_repo
    scratch = tmp_path / "scratch"
    git(tmp_path, "clone", "-q", str(repo), str(scratch))
    git(scratch, "checkout", "-q", pinned)
    (scratch / "toypkg" / "layers.py").write_text("SCALE = 3\n\ndef forward(x):\n    return x * SCALE\n")
    directory = tmp_path / "patches" / "toymodel"
    directory.mkdir(parents=True)
    (directory / "01_scale.patch").write_text(git(scratch, "diff") + "\n")
    (directory / "02_offset.py").write_text(textwrap.dedent("""
        def on_import(root, import_module):
            layers = import_module("toypkg.layers")
            original = layers.forward
            layers.forward = lambda x: original(x) + 1
    """))
    return directory


@pytest.fixture(autouse=True)
def forget_toypkg():
    yield
    for name in [m for m in sys.modules if m == "toypkg" or m.startswith("toypkg.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if "upstream" not in p or "toymodel" not in p]


def test_checkout_is_the_pinned_commit_with_patches_and_hooks(tmp_path, upstream_repo, patches):
    repo, pinned = upstream_repo
    source = UpstreamSource("toymodel", "https://example.invalid/toy.git", pinned, patches)
    checkout = source.checkout(tmp_path / "cache", repo.parent)
    assert (checkout.root / "toypkg" / "layers.py").read_text().startswith("SCALE = 3")
    assert (checkout.root / MANIFEST).is_file() and not (checkout.root / ".git").exists()
    layers = checkout.import_module("toypkg.layers")
    assert layers.forward(10) == 31  # patched scale 3, then the hook's +1


def test_bare_mirror_works_as_origin(tmp_path, upstream_repo, patches):
    repo, pinned = upstream_repo
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(mirrors / "toymodel.git"))
    checkout = UpstreamSource("toymodel", "", pinned, patches).checkout(tmp_path / "cache", mirrors)
    assert (checkout.root / "toypkg" / "layers.py").read_text().startswith("SCALE = 3")


def test_built_once_and_rebuilt_when_incomplete(tmp_path, upstream_repo, patches):
    repo, pinned = upstream_repo
    source = UpstreamSource("toymodel", "", pinned, patches)
    first = source.checkout(tmp_path / "cache", repo.parent)
    marker = first.root / "toypkg" / "marker"
    marker.write_text("kept while complete")
    assert source.checkout(tmp_path / "cache", repo.parent).root == first.root and marker.exists()
    (first.root / MANIFEST).unlink()  # what an interrupted build looks like
    source.checkout(tmp_path / "cache", repo.parent)
    assert not marker.exists() and (first.root / MANIFEST).is_file()


def test_nothing_staged_says_what_to_stage(tmp_path):
    source = UpstreamSource("toymodel", "https://example.invalid/toy.git", "0" * 40, tmp_path / "none")
    with pytest.raises(UpstreamNotStaged, match=r"clone https://example.invalid/toy.git .* to .*toymodel"):
        source.checkout(tmp_path / "cache", tmp_path / "empty-root")


def test_missing_commit_is_reported(tmp_path, upstream_repo):
    repo, _ = upstream_repo
    with pytest.raises(UpstreamError, match="does not contain the pinned commit"):
        UpstreamSource("toymodel", "", "f" * 40, tmp_path / "none").checkout(tmp_path / "cache", repo.parent)


def test_patch_that_does_not_apply_is_named(tmp_path, upstream_repo, patches):
    repo, pinned = upstream_repo
    (patches / "01_scale.patch").write_text((patches / "01_scale.patch").read_text().replace("SCALE = 2", "SCALE = 7"))
    with pytest.raises(UpstreamError, match="01_scale.patch: does not apply"):
        UpstreamSource("toymodel", "", pinned, patches).checkout(tmp_path / "cache", repo.parent)
    leftovers = [p.name for p in (tmp_path / "cache" / "upstream").iterdir() if p.is_dir()]
    assert leftovers == [], "no partial checkout may remain"
