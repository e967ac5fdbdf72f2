"""Checkpoint loading errors name the file and the offending keys; seeded weights are reproducible."""
from __future__ import annotations

import pytest
import torch

from tooling.seeded import apply_seeded_weights, seeded_digest, seeded_tensor
from tooling.slice import ModelSlice
from tooling.weights import CheckpointError, WeightsChoice, apply_weights, extract_state_dict, load_strict, read_checkpoint


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.BatchNorm2d(3)


def test_seeded_recipe_depends_only_on_names_shapes_and_salt():
    a, b = apply_seeded_weights(Tiny()), apply_seeded_weights(Tiny())
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not a.training
    assert torch.all(a.norm.running_var >= 0.5) and torch.all(a.norm.running_var <= 1.5)
    assert not torch.equal(seeded_tensor("conv.weight", (3, 2, 3, 3), "x"), a.conv.weight)
    assert a.norm.num_batches_tracked.item() == 0  # integer buffers are left alone
    assert seeded_digest(a) == seeded_digest(b) != seeded_digest(a, "other")


@pytest.mark.parametrize("content", [b"", b"garbage that is no zip and no pickle"])
def test_unreadable_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        read_checkpoint(path)


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(Tiny().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable torch checkpoint"):
        read_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth: checkpoint file not found"):
        read_checkpoint(tmp_path / "nothere.pth")


def test_state_dict_found_under_a_named_entry(tmp_path):
    state = Tiny().state_dict()
    found = extract_state_dict({"epoch": 3, "model_pos": state}, tmp_path / "c.bin", ["model_pos"])
    assert set(found) == set(state)
    with pytest.raises(CheckpointError, match=r"c.bin: no state_dict of tensors found \(looked for entries \['model_pos'\]\)"):
        extract_state_dict({"epoch": 3, "weights": state}, tmp_path / "c.bin", ["model_pos"])


def test_strict_load_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    state = Tiny().state_dict()
    del state["norm.bias"]
    state["head.weight"] = torch.zeros(1)
    state["conv.weight"] = torch.zeros(3, 2, 5, 5)
    with pytest.raises(CheckpointError) as info:
        load_strict(Tiny(), state, tmp_path / "c.pth")
    message = str(info.value)
    assert "c.pth" in message and "1 missing keys: norm.bias" in message
    assert "1 unexpected keys: head.weight" in message
    assert "conv.weight: checkpoint (3, 2, 5, 5) vs network (3, 2, 3, 3)" in message


def test_checkpoint_goes_through_the_slice_adapter(tmp_path):
    source = apply_seeded_weights(Tiny(), "ckpt")
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = Tiny().train()
    digest = apply_weights(target, WeightsChoice(path), ModelSlice(), "tiny", ["state_dict"])
    assert digest.startswith("sha256-") and not target.training
    assert torch.equal(target.conv.weight, source.conv.weight)


def test_training_checkpoint_with_pickled_state_loads_with_a_warning(tmp_path):
    import numpy as np

    path = tmp_path / "train.bin"
    torch.save({"random_state": np.random.RandomState(0).get_state(), "model": Tiny().state_dict()}, path)
    with pytest.warns(UserWarning, match="train.bin: holds non-tensor objects"):
        raw = read_checkpoint(path)
    assert set(extract_state_dict(raw, path, ["model"])) == set(Tiny().state_dict())
