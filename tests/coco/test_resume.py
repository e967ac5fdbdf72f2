"""An interrupted top-down pass resumes from its stored batches instead of starting over."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tooling.coco.pipeline import evaluate_topdown
from tooling.coco.synthetic import GroundTruthHeatmapOracle, write_synthetic_coco
from tooling.coco.topdown import TopDownConfig, build_topdown_samples
from tooling.progress import ResultStore

CONFIG = TopDownConfig()


class Interrupted(RuntimeError):
    pass


def test_resumed_pass_reuses_finished_batches_and_gives_the_same_score(tmp_path: Path) -> None:
    dataset = write_synthetic_coco(tmp_path / "coco", seed=1, num_images=6)
    samples = build_topdown_samples(dataset.coco, CONFIG)
    oracle = GroundTruthHeatmapOracle(dataset, samples, CONFIG)
    calls: list[int] = []
    budget = {"calls": 4}  # two batches, each with its mirrored pass

    def dies_after_two_batches(inputs: np.ndarray) -> np.ndarray:
        calls.append(len(inputs))
        if len(calls) > budget["calls"]:
            raise Interrupted("killed mid-run")
        return oracle(inputs)

    fingerprint = {"backend": "oracle", "data": "synthetic-1"}
    with pytest.raises(Interrupted):
        evaluate_topdown(dataset, dies_after_two_batches, batch_size=2, config=CONFIG,
                         store=ResultStore(tmp_path / "run", fingerprint))
    store = ResultStore(tmp_path / "run", fingerprint)
    assert store.resumed == 2
    calls.clear()
    budget["calls"] = 10**6
    resumed = evaluate_topdown(dataset, dies_after_two_batches, batch_size=2, config=CONFIG, store=store)
    batches = -(-len(samples) // 2)
    assert len(calls) == 2 * (batches - 2)
    fresh = evaluate_topdown(dataset, oracle, batch_size=2, config=CONFIG)
    assert resumed.stats == fresh.stats and resumed.results == fresh.results
