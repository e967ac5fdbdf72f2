"""Upstream sources: pinned commit from a staged clone or mirror, patches and hooks applied once."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from tooling import sources
from tooling.baseline import load_model_spec, model_names
from tooling.model_spec import PROJECT_ROOT
from tooling.sources import (
    MANIFEST,
    UpstreamDependencyMissing,
    UpstreamError,
    UpstreamNotStaged,
    UpstreamSource,
    build_from_experiment,
    dependency_status,
    upstream_source,
    upstream_sources,
)


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


# -- isolation of checkouts that ship the same top-level packages -----------------------------------

def hrnet_family_repo(commit_files, parent: Path, name: str, scale: float, offset: float) -> tuple[Path, str]:
    """A repository laid out as the HRNet family's are: ``lib/config`` (a yacs CfgNode),
    ``lib/models`` importing its networks by absolute name, ``lib/utils``, and an experiment yaml.
    Two of these share every package name and differ only in what their code computes."""
    repo = parent / name
    files = {
        "lib/config/__init__.py": "from .default import _C as cfg\n",
        "lib/config/default.py": "from yacs.config import CfgNode as CN\n\n_C = CN()\n_C.MODEL = CN()\n_C.MODEL.SCALE = 1.0\n",
        "lib/models/__init__.py": "import models.net\n",
        "lib/models/net.py": textwrap.dedent("""
            import torch
            from utils.helpers import OFFSET


            class Net(torch.nn.Module):
                def __init__(self, scale):
                    super().__init__()
                    self.scale = scale

                def forward(self, x):
                    return x * self.scale + OFFSET


            def get_pose_net(cfg, is_train):
                return Net(cfg.MODEL.SCALE)
        """),
        "lib/utils/__init__.py": "",
        "lib/utils/helpers.py": f"OFFSET = {offset}\n",
        "experiments/net.yaml": f"MODEL:\n  SCALE: {scale}\n",
    }
    return repo, commit_files(repo, files)


@pytest.fixture
def two_family_repos(tmp_path, commit_files):
    root = tmp_path / "upstream-root"
    return root, {
        "alpha": hrnet_family_repo(commit_files, root, "alpha", scale=2.0, offset=1.0),
        "beta": hrnet_family_repo(commit_files, root, "beta", scale=10.0, offset=-3.0),
    }


EXPECTED_AT_ONE = {"alpha": 3.0, "beta": 7.0}  # scale * 1 + offset


@pytest.mark.parametrize("order", [("alpha", "beta"), ("beta", "alpha")])
def test_checkouts_sharing_package_names_import_in_either_order(tmp_path, two_family_repos, order):
    root, repos = two_family_repos
    import_state = (list(sys.path), {n for n in sys.modules if n.split(".")[0] in ("config", "models", "utils")})
    results, checkouts = {}, {}
    for name in order:
        checkouts[name] = UpstreamSource(name, "", repos[name][1], tmp_path / "no-patches").checkout(tmp_path / "cache", root)
        net = build_from_experiment(checkouts[name], "models.net", "experiments/net.yaml")
        results[name] = float(net(torch.ones(1)))
    assert results == EXPECTED_AT_ONE
    # Nothing of either checkout leaks into the process: the next import of either is unaffected.
    assert (list(sys.path), {n for n in sys.modules if n.split(".")[0] in ("config", "models", "utils")}) == import_state
    # Later imports from one checkout still get its own modules, after the other was imported.
    offsets = {n: c.import_module("utils.helpers", subdir="lib").OFFSET for n, c in checkouts.items()}
    assert offsets == {"alpha": 1.0, "beta": -3.0}


def test_a_module_already_imported_under_a_shared_name_is_set_aside_and_restored(tmp_path, two_family_repos):
    root, repos = two_family_repos
    unrelated = types.ModuleType("utils")
    sys.modules["utils"] = unrelated
    try:
        checkout = UpstreamSource("alpha", "", repos["alpha"][1], tmp_path / "none").checkout(tmp_path / "cache", root)
        assert build_from_experiment(checkout, "models.net", "experiments/net.yaml")(torch.ones(1)).item() == 3.0
        assert sys.modules["utils"] is unrelated
    finally:
        del sys.modules["utils"]


def test_stand_ins_serve_only_the_checkout_import(tmp_path, commit_files):
    repo = tmp_path / "upstream" / "needsvision"
    pinned = commit_files(repo, {"pkg/__init__.py": "import fakevision.ops as ops\n\nLAYER = ops.Layer\n"})
    ops = types.ModuleType("fakevision.ops")
    ops.Layer = "served"
    package = types.ModuleType("fakevision")
    package.__path__ = []
    package.ops = ops
    stand_ins = {"fakevision": (package, "fakevision by a test double"), "fakevision.ops": (ops, "fakevision by a test double")}
    checkout = UpstreamSource("needsvision", "", pinned, tmp_path / "none").checkout(
        tmp_path / "cache", repo.parent
    )
    assert checkout.import_module("pkg", stand_ins=stand_ins).LAYER == "served"
    assert "fakevision" not in sys.modules and "fakevision.ops" not in sys.modules
    assert checkout.stand_ins == {"fakevision": "fakevision by a test double", "fakevision.ops": "fakevision by a test double"}


def test_a_module_the_checkout_lacks_is_reported(tmp_path, two_family_repos):
    root, repos = two_family_repos
    checkout = UpstreamSource("alpha", "", repos["alpha"][1], tmp_path / "none").checkout(tmp_path / "cache", root)
    with pytest.raises(UpstreamError, match="not to the upstream checkout"):
        checkout.import_module("yaml")  # importable, but from site-packages


# -- packages upstream code imports -----------------------------------------------------------------

@pytest.fixture
def pyproject_pinning(tmp_path, monkeypatch):
    def write(*pins: str) -> Path:
        path = tmp_path / "pyproject.toml"
        path.write_text("[project]\nname = 'x'\n[project.optional-dependencies]\nupstream = [%s]\n" % ", ".join(f'"{p}"' for p in pins))
        monkeypatch.setattr(sources, "PYPROJECT", path)
        return path
    return write


def test_missing_upstream_dependency_is_named_with_its_install_command(tmp_path, upstream_repo, pyproject_pinning):
    repo, pinned = upstream_repo
    pyproject_pinning("yacs==0.1.8", "zoo-absent-package==1.2.3")
    source = UpstreamSource("toymodel", "", pinned, tmp_path / "none", requires=("yacs", "zoo_absent_package"))
    with pytest.raises(UpstreamDependencyMissing) as raised:
        source.checkout(tmp_path / "cache", repo.parent)
    message = str(raised.value)
    assert "zoo-absent-package==1.2.3 (not installed)" in message and "yacs" not in message.split("install with")[0]
    assert "pip install 'zoo-absent-package==1.2.3'" in message and "pip install -e '.[upstream]'" in message


def test_wrong_version_of_an_upstream_dependency_is_reported(tmp_path, upstream_repo, pyproject_pinning):
    repo, pinned = upstream_repo
    pyproject_pinning("yacs==0.0.1")
    with pytest.raises(UpstreamDependencyMissing, match=r"yacs==0.0.1 \(0.1.8 installed\)"):
        UpstreamSource("toymodel", "", pinned, tmp_path / "none", requires=("yacs",)).checkout(tmp_path / "cache", repo.parent)


def test_a_requirement_the_extra_does_not_pin_is_an_error(pyproject_pinning):
    pyproject = pyproject_pinning("yacs==0.1.8")
    with pytest.raises(UpstreamError, match=f"{pyproject}: the \\[upstream\\] extra does not pin torchvision"):
        dependency_status(("torchvision",))


def test_every_baseline_upstream_requirement_is_pinned_in_the_extra_and_requirements_txt():
    requirements = {line.split("==")[0]: line.strip() for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#")}
    for spec in map(load_model_spec, model_names()):
        for source in upstream_sources(spec).values():
            for status in dependency_status(source.requires):
                assert requirements.get(status.requirement.name) == str(status.requirement), source.name


# -- the gate's verdicts on what is (not) staged -------------------------------------------------

def upstream_gate_outcome(tmp_path, monkeypatch, error: Exception) -> BaseException:
    from tooling.conformance import ConformanceSuite
    from tooling.locations import Roots
    from tooling.model_spec import Case
    from tooling.workspace import ModelHandle, Workspace

    def checkout(self, network):
        raise error

    monkeypatch.setattr(ModelHandle, "upstream_checkout", checkout)
    suite = type("TestToy", (ConformanceSuite,), {"model": "videopose3d"})()
    zoo = Workspace(Roots(None, None, None, tmp_path / "cache"))
    case = Case("videopose3d", "vp3d", "dims:frames=250", 1, "torchscript", "default", False)
    request = types.SimpleNamespace(node=types.SimpleNamespace(user_properties=[]))
    with pytest.raises(BaseException) as raised:
        suite.test_port_matches_upstream(zoo, case, request)
    return raised.value


def test_upstream_gate_skips_when_nothing_is_staged(tmp_path, monkeypatch):
    outcome = upstream_gate_outcome(tmp_path, monkeypatch, UpstreamNotStaged("upstream videopose3d not staged: clone ..."))
    assert isinstance(outcome, pytest.skip.Exception) and "not staged" in str(outcome)


def test_upstream_gate_fails_when_staged_but_a_package_is_missing(tmp_path, monkeypatch):
    message = "upstream videopose3d is staged but its code needs yacs==0.1.8 (not installed): install with ..."
    outcome = upstream_gate_outcome(tmp_path, monkeypatch, UpstreamDependencyMissing(message))
    assert isinstance(outcome, pytest.fail.Exception) and str(outcome) == message


# -- several checkouts per model ------------------------------------------------------------------

def two_checkout_spec(root: Path, commit_files) -> types.SimpleNamespace:
    """A model whose main network comes from one repository and its scorer from another, both
    shipping a top-level ``net`` package (as pose repositories and model repositories do)."""
    main_pin = commit_files(root / "toy", {"net/__init__.py": "WHO = 'toy'\n"})
    scorer_pin = commit_files(root / "toy-scorer", {"net/__init__.py": "WHO = 'scorer'\n"})
    return types.SimpleNamespace(name="toy", upstream={
        "toy": {"repository": "https://example.invalid/toy.git", "commit": main_pin},
        "toy-scorer": {"repository": "https://example.invalid/scorer.git", "commit": scorer_pin, "networks": ["scorer"]},
    })


def test_each_network_is_built_from_its_own_checkout(tmp_path, commit_files):
    root = tmp_path / "upstream-root"
    spec = two_checkout_spec(root, commit_files)
    assert set(upstream_sources(spec)) == {"toy", "toy-scorer"}
    assert upstream_source(spec, "scorer").name == "toy-scorer"
    assert upstream_source(spec, "detector").name == upstream_source(spec, "generator").name == "toy"
    main, scorer = (upstream_source(spec, n).checkout(tmp_path / "cache", root) for n in ("detector", "scorer"))
    assert main.root != scorer.root and scorer.root.name.startswith("toy-scorer-")
    assert upstream_source(spec, "scorer").patches_dir.name == "toy-scorer"
    assert (main.import_module("net").WHO, scorer.import_module("net").WHO) == ("toy", "scorer")
    assert "net" not in sys.modules


def test_only_listed_networks_come_from_a_checkout_that_lists_them():
    spec = types.SimpleNamespace(name="toy", upstream={"toy-scorer": {"commit": "0" * 40, "networks": ["scorer"]}})
    assert upstream_source(spec, "scorer").name == "toy-scorer" and upstream_source(spec, "detector") is None
    assert upstream_sources(types.SimpleNamespace(name="toy", upstream={})) == {}


def test_each_checkout_not_staged_names_its_own_path_and_networks(tmp_path, monkeypatch, commit_files):
    root = tmp_path / "upstream-root"
    spec = two_checkout_spec(root, commit_files)
    empty = tmp_path / "empty-root"
    with pytest.raises(UpstreamNotStaged) as raised:
        upstream_source(spec, "scorer").checkout(tmp_path / "cache", empty)
    message = str(raised.value)
    assert message.startswith("upstream toy-scorer (for scorer) not staged: clone https://example.invalid/scorer.git")
    assert f"to {empty / 'toy-scorer'} or a bare mirror to {empty / 'toy-scorer.git'}" in message
    assert "ZOO_UPSTREAM_URL_TOY_SCORER" in message
    # The variable names one checkout: the other is still not staged.
    monkeypatch.setenv("ZOO_UPSTREAM_URL_TOY_SCORER", str(root / "toy-scorer"))
    assert upstream_source(spec, "scorer").checkout(tmp_path / "cache", empty).import_module("net").WHO == "scorer"
    with pytest.raises(UpstreamNotStaged, match=f"upstream toy not staged: .* to {empty / 'toy'} "):
        upstream_source(spec, "detector").checkout(tmp_path / "cache", empty)


# -- mirrors that lack some blobs (snapshots, partial clones without large files) ---------------------

def repo_missing_blobs(tmp_path: Path, commit_files, missing: list[str]) -> tuple[Path, str]:
    repo = tmp_path / "upstream-root" / "toymodel"
    pinned = commit_files(repo, {"toypkg/__init__.py": "", "toypkg/layers.py": "SCALE = 2\n", "docs/demo #1.gif": "GIF89a...",
                                 "weights/big.pth": "not really a checkpoint"})
    for rel in missing:  # loose objects: delete the blob's file, as a snapshot without it would be
        sha = git(repo, "rev-parse", f"HEAD:{rel}")
        (repo / ".git" / "objects" / sha[:2] / sha[2:]).unlink()
    return repo, pinned


def test_a_mirror_without_some_data_files_checks_out_the_rest_and_lists_them(tmp_path, commit_files):
    repo, pinned = repo_missing_blobs(tmp_path, commit_files, ["docs/demo #1.gif", "weights/big.pth"])
    checkout = UpstreamSource("toymodel", "", pinned, tmp_path / "none").checkout(tmp_path / "cache", repo.parent)
    assert checkout.absent == ("docs/demo #1.gif", "weights/big.pth")
    assert not (checkout.root / "docs" / "demo #1.gif").exists() and not (checkout.root / "weights" / "big.pth").exists()
    assert checkout.import_module("toypkg.layers").SCALE == 2
    again = UpstreamSource("toymodel", "", pinned, tmp_path / "none").checkout(tmp_path / "cache", repo.parent)
    assert again.root == checkout.root and again.absent == checkout.absent  # intact, not rebuilt


def test_a_mirror_without_a_source_file_is_refused_by_name(tmp_path, commit_files):
    repo, pinned = repo_missing_blobs(tmp_path, commit_files, ["toypkg/layers.py", "weights/big.pth"])
    with pytest.raises(UpstreamError, match=r"lacks the contents of 1 source file\(s\) of toymodel@\w{12} \(toypkg/layers.py\)"):
        UpstreamSource("toymodel", "", pinned, tmp_path / "none").checkout(tmp_path / "cache", repo.parent)
