"""Sharded dataset passes (tooling/shards.py): the split, the merge, and, on every model's
known-answer set, figures bit-identical to the unsharded pass even when a shard was killed
mid-way and resumed; a missing or damaged shard is named, never dropped."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tooling.accuracy import run_accuracy
from tooling.models.videopose3d.network import ONE_SIDED_PAD
from tooling.shards import DONE, Shard, ShardIncomplete, merge_id, parse_merge, split
from tooling.slice import PassSample

MODELS = ("videopose3d", "transpose", "dekr", "gma", "fomm")


def _samples(*units: int) -> list[PassSample]:
    return [PassSample(f"s{i}", None, u) for i, u in enumerate(units)]


def test_split_is_contiguous_balanced_by_units_and_covers_every_sample():
    samples = _samples(*[1] * 10)
    parts = split(samples, 3)
    assert [len(p) for p in parts] == [3, 4, 3] and [s for p in parts for s in p] == samples
    # A long clip weighs more than short ones: its part holds fewer samples.
    parts = split(_samples(9, 1, 1, 1, 1, 1, 1, 1, 1, 1), 2)
    assert [len(p) for p in parts] == [1, 9]
    assert [len(p) for p in split(_samples(1, 1), 4)] == [0, 1, 0, 1]  # fewer samples than shards: some empty


def test_shard_and_merge_ids_round_trip():
    assert Shard.parse(Shard(2, 4).id) == Shard(2, 4) and Shard.parse("merge4") is None
    assert parse_merge(merge_id(4)) == 4 and parse_merge("shard1of4") is None
    with pytest.raises(ValueError, match="within 1..2"):
        Shard(3, 2)


@pytest.fixture
def staged(zoo, known_answers):
    def handle(model: str):
        answer = known_answers(model)
        ws = zoo.with_roots(data_root=answer.data_root, weights_root=answer.weights_root)
        return ws.model(model), answer

    return handle


class Killed(RuntimeError):
    pass


def _vp3d_lifted_to_zero_depth(feeds):
    """VideoPose3D's oracle: each frame's 2-D pose at depth 0, in place of its network."""
    poses = feeds["2d_poses"][:, ONE_SIDED_PAD:-ONE_SIDED_PAD]
    return {"3d_preds": np.concatenate([poses, np.zeros_like(poses[..., :1])], axis=-1)}


# VideoPose3D's known-answer set runs its real network (243-frame receptive field, ~0.6 s a call,
# forty calls here); through an oracle the split, resume and merge (the slice's own per-sequence
# records and merge) are the same, in a blink. DEKR and TransPose score their real networks through
# ONNX Runtime here, so a network's figures bit-identical across shard sessions are still proven;
# the tier's known-answer rows run VideoPose3D's network over this same set.
FAST_ORACLES = {"videopose3d": {"vp3d": _vp3d_lifted_to_zero_depth}}


@pytest.mark.accuracy
@pytest.mark.parametrize("model", MODELS)
def test_sharded_pass_gives_the_unsharded_figures_bit_for_bit(model, staged, tmp_path, monkeypatch):
    """Unsharded, then (up to) three shards where the second dies after its first sample (before
    it, when it holds one) and is rerun, resuming what it kept; the merge scores the rest, and
    every figure is the same float as unsharded."""
    handle, answer = staged(model)
    options = dict(profile=answer.profile, oracles={**FAST_ORACLES.get(model, {}), **answer.oracles},
                   label=f"{model} shards")
    whole = run_accuracy(handle, "onnxruntime", run_dir=tmp_path / "whole", **options)

    scored: list[str] = []
    original = handle.slice.score_sample
    die_after: list[int] = []

    def counting(ctx, sample, advance):
        if die_after and len(scored) >= die_after[0]:
            raise Killed(f"killed before {sample.id}")
        scored.append(sample.id)
        return original(ctx, sample, advance)

    monkeypatch.setattr(handle.slice, "score_sample", counting)
    samples = handle.slice.accuracy_samples(_plan_ctx(handle, answer))
    count = min(3, len(samples))
    parts = split(samples, count)
    victim = next((i for i in range(2, count + 1) if parts[i - 1]), 1)  # the first non-empty shard after the first
    sharded = tmp_path / "sharded"
    for index in range(1, victim):
        run_accuracy(handle, "onnxruntime", run_dir=sharded, shard=Shard(index, count), **options)
    before = len(scored)
    die_after.append(before + min(1, len(parts[victim - 1]) - 1))  # mid-shard where it holds two samples or more
    with pytest.raises(Killed):
        run_accuracy(handle, "onnxruntime", run_dir=sharded, shard=Shard(victim, count), **options)
    kept = scored[before:]
    die_after.clear()
    run_accuracy(handle, "onnxruntime", run_dir=sharded, shard=Shard(victim, count), **options)
    assert not set(kept) & set(scored[before + len(kept):]), "the rerun rescored a kept record"
    # Later shards are left to the merge, as when their items have not run yet.
    merged = run_accuracy(handle, "onnxruntime", run_dir=sharded, shards=count, **options)
    assert merged == whole  # dict equality: the same keys and bit-identical floats
    assert sorted(scored) == sorted(s.id for s in samples)  # each sample scored exactly once


def _plan_ctx(handle, answer):
    from tooling.locations import data_paths
    from tooling.slice import AccuracyContext

    roots = handle.ws.roots
    profile = handle.spec.profiles[answer.profile]
    return AccuracyContext(spec=handle.spec, data_paths=data_paths(handle.spec, roots), run=None,
                           progress=lambda *_: None, results=None, dims={**profile.dims, "batch": profile.batch_sizes[0]})


@pytest.mark.accuracy
def test_a_damaged_or_missing_shard_is_named_and_the_rerun_completes(staged, tmp_path):
    """On GMA's known-answer set, scored through its oracle in a blink: what is checked here is
    the shards' bookkeeping, which knows no model (the figures are the test above's business)."""
    handle, answer = staged("gma")
    options = dict(profile=answer.profile, oracles=answer.oracles, label="gma shards")
    run_dir = tmp_path / "run"
    for index in (1, 2):
        run_accuracy(handle, "onnxruntime", run_dir=run_dir, shard=Shard(index, 2), **options)
    record = sorted((run_dir / "shards" / "shard2of2" / "records").glob("*.npz"))[0]
    record.write_bytes(record.read_bytes()[:-7] + b"garbage")
    with pytest.raises(ShardIncomplete, match=rf"shard 2/2 of gma shards .*record .*\({re.escape(record.name)}\) is damaged"):
        run_accuracy(handle, "onnxruntime", run_dir=run_dir, shards=2, **options)
    assert not (run_dir / "shards" / "shard2of2" / DONE).exists()  # that shard is to be rerun
    (run_dir / "shards" / "shard1of2" / DONE).write_text("{not json")
    with pytest.raises(ShardIncomplete, match=r"shard 1/2 of gma shards .*damaged"):
        run_accuracy(handle, "onnxruntime", run_dir=run_dir, shards=2, **options)
    whole = run_accuracy(handle, "onnxruntime", run_dir=tmp_path / "whole", **options)
    # The merge rescoring the two unfinished shards itself (their other records kept) completes.
    assert run_accuracy(handle, "onnxruntime", run_dir=run_dir, shards=2, **options) == whole
