"""The command line: verify-golden verdicts and the staging report."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tooling import sources
from tooling.baseline import load_model_spec
from tooling.cli import main
from tooling.locations import Roots, staged_inventory
from tooling.model_spec import FIXTURES_DIR
from tooling.models.videopose3d.network import build_vp3d
from tooling.seeded import apply_seeded_weights

GOLDEN = FIXTURES_DIR / "videopose3d" / "golden" / "vp3d_public.npz"


@pytest.mark.videopose3d
def test_verify_golden_accepts_the_public_golden(capsys):
    assert main(["verify-golden", "videopose3d", "vp3d", str(GOLDEN)]) == 0
    assert capsys.readouterr().out.startswith("ok   3d_preds (2, 158, 17, 3)")


@pytest.mark.videopose3d
def test_verify_golden_uses_the_salt_the_file_was_made_with(tmp_path, capsys):
    poses = torch.randn(2, 250, 17, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        preds = apply_seeded_weights(build_vp3d(), "nightly-7")(poses)
    golden = tmp_path / "salted.npz"
    np.savez(golden, **{"2d_poses": poses.numpy(), "3d_preds": preds.numpy()})
    assert main(["verify-golden", "videopose3d", "vp3d", str(golden), "--salt", "nightly-7"]) == 0
    assert main(["verify-golden", "videopose3d", "vp3d", str(golden)]) == 1
    assert "FAIL 3d_preds" in capsys.readouterr().out


def test_verify_golden_names_missing_arrays(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros(1))
    assert main(["verify-golden", "videopose3d", "vp3d", str(bad)]) == 2
    assert "bad.npz: lacks arrays ['2d_poses', '3d_preds']" in capsys.readouterr().err


def test_stage_check_lists_expected_paths(tmp_path, capsys):
    (tmp_path / "data" / "human36m").mkdir(parents=True)
    (tmp_path / "data" / "human36m" / "data_3d_h36m.npz").write_bytes(b"x")
    assert main(["stage", "--check", "--data-root", str(tmp_path / "data"), "--weights-root", str(tmp_path / "w"), "videopose3d"]) == 1
    out = capsys.readouterr().out
    assert "found   data       human36m/data_3d_h36m.npz" in out
    assert "MISSING checkpoint vp3d" in out and str(tmp_path / "w" / "videopose3d" / "model_best.bin") in out


def test_stage_check_names_a_missing_upstream_package_with_its_install_command(tmp_path, monkeypatch, capsys):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n[project.optional-dependencies]\nupstream = ["yacs==0.0.1"]\n')
    monkeypatch.setattr(sources, "PYPROJECT", pyproject)
    (tmp_path / "up" / "transpose").mkdir(parents=True)
    main(["stage", "--check", "--upstream-root", str(tmp_path / "up"), "transpose"])
    out = capsys.readouterr().out
    assert "MISSING python     yacs==0.0.1 (upstream transpose code)" in out and "pip install 'yacs==0.0.1'" in out
    roots = Roots.resolve(upstream_root=tmp_path / "up")
    (dependency,) = [i for i in staged_inventory(load_model_spec("transpose"), roots) if i.kind == "python"]
    assert dependency.expected == "pip install 'yacs==0.0.1'" and not dependency.found
    assert dependency.required, "a staged upstream whose packages are missing must fail stage --check"
    (dependency,) = [i for i in staged_inventory(load_model_spec("transpose"), Roots.resolve()) if i.kind == "python"]
    assert not dependency.required, "nothing staged: the upstream gate skips, its packages are optional"


def test_stage_check_names_each_upstream_checkout_a_model_expects(tmp_path, capsys):
    """FOMM builds its networks from two repositories: each is listed with the networks it serves
    and its own expected path; one staged (as a bare mirror) and one not, each says so."""
    up = tmp_path / "up"
    (up / "fomm-pose-estimation.git").mkdir(parents=True)
    assert main(["stage", "--check", "--upstream-root", str(up), "fomm"]) == 1  # data and checkpoints missing
    lines = [line for line in capsys.readouterr().out.splitlines() if " upstream " in line]
    assert len(lines) == 2, lines
    first_order, pose = lines
    assert first_order.split()[:3] == ["MISSING", "upstream", "fomm:"]
    assert "first-order-model.git @ 3d152de07e51 (kp_detector, generator)" in first_order
    assert first_order.endswith(f"{up / 'fomm'} (or fomm.git)")
    assert pose.split()[:3] == ["found", "upstream", "fomm-pose-estimation:"]
    assert "pytorch_Realtime_Multi-Person_Pose_Estimation.git @ 257d8b4f2bd6 (pose_estimator)" in pose
    assert pose.endswith(str(up / "fomm-pose-estimation.git"))
