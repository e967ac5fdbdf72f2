"""End-to-end top-down evaluation: GT-box samples -> crops -> model -> flip fusion -> DARK ->
rescoring/OKS-NMS -> results json -> COCOeval.

The model is any ``run_batch(inputs [N,3,H,W] float32) -> heatmaps [N,K,h,w]`` callable, so the
same loop drives torch, onnxruntime, OpenVINO or a known-answer oracle.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tooling.coco.dataset import CocoKeypointDataset, read_image_rgb
from tooling.coco.evaluation import evaluate_keypoints, first_image_ids, write_results_json
from tooling.coco.topdown import (
    PersonPredictions,
    TopDownConfig,
    TopDownSample,
    build_topdown_samples,
    decode_heatmaps,
    fuse_flip,
    keypoint_results,
    preprocess_sample,
)
from tooling.coco.transforms import flip_width

RunBatch = Callable[[np.ndarray], np.ndarray]


class BatchStore(Protocol):
    """Keeps per-batch results so an interrupted pass resumes (tooling.progress.ResultStore)."""

    def cached(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TopDownProgress:
    """Where a run stands after a batch; rates and ETA are per image, the unit of ``limit``."""

    images_done: int
    images_total: int
    samples_done: int
    samples_total: int
    elapsed_s: float

    @property
    def images_per_s(self) -> float:
        return self.images_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None until a rate exists."""
        rate = self.images_per_s
        return (self.images_total - self.images_done) / rate if rate > 0 else None


ProgressCallback = Callable[[TopDownProgress], None]


@dataclass(frozen=True)
class TopDownEvaluation:
    stats: dict[str, float]
    results: list[dict[str, Any]]
    image_ids: list[int]
    num_samples: int
    elapsed_s: float


class ImageCache:
    """Keeps the last decoded image: samples of one image are consecutive."""

    def __init__(self, dataset: CocoKeypointDataset) -> None:
        self._dataset = dataset
        self._cached: tuple[int, np.ndarray] | None = None

    def rgb(self, image_id: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != image_id:
            self._cached = (image_id, read_image_rgb(self._dataset.image_path(image_id)))
        return self._cached[1]


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def _run_padded(run_batch: RunBatch, inputs: np.ndarray, batch_size: int, pad: bool,
                expected_map_shape: tuple[int, int, int]) -> np.ndarray:
    """Call the model, zero-padding a short last batch for fixed-batch backends."""
    count = len(inputs)
    if pad and count < batch_size:
        padding = np.zeros((batch_size - count, *inputs.shape[1:]), dtype=inputs.dtype)
        inputs = np.concatenate((inputs, padding))
    outputs = np.asarray(run_batch(inputs))
    expected = (len(inputs), *expected_map_shape)
    if outputs.shape != expected:
        raise ValueError(f"run_batch returned heatmaps of shape {outputs.shape}, "
                         f"expected {expected}")
    return outputs[:count].astype(np.float32, copy=False)


def _images_completed(samples: Sequence[TopDownSample], done: int, image_position: dict[int, int],
                      images_total: int) -> int:
    """Images whose samples are all processed once the first ``done`` samples are: every image
    before the next sample's one (people-free images included)."""
    if done == len(samples):
        return images_total
    return image_position[samples[done].image_id]


def topdown_batches(samples: Sequence[TopDownSample], batch_size: int) -> list[tuple[str, slice]]:
    """The pass's batches: each one's record key and its slice of ``samples``. Keyed by the batch's
    first and last annotation, so a resumed pass only reuses a batch that covers exactly the same
    samples, and a sharded pass batches exactly as an unsharded one (same figures, bit for bit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [(f"batch-{samples[b.start].annotation_id}-{samples[b.stop - 1].annotation_id}-{b.stop - b.start}", b)
            for b in _batches(len(samples), batch_size)]


def decode_batch(
    dataset: CocoKeypointDataset,
    chunk: Sequence[TopDownSample],
    run_batch: RunBatch,
    config: TopDownConfig,
    *,
    batch_size: int,
    flip_test: bool = True,
    pad_batches: bool = True,
    images: ImageCache | None = None,
) -> dict[str, np.ndarray]:
    """One batch's decoded keypoints (``preds``) and scores (``maxvals``): the record a pass keeps."""
    map_shape = (config.num_joints, config.heatmap_size[1], config.heatmap_size[0])
    images = images or ImageCache(dataset)
    inputs = np.stack([preprocess_sample(images.rgb(s.image_id), s, config) for s in chunk])
    heatmaps = _run_padded(run_batch, inputs, batch_size, pad_batches, map_shape)
    if flip_test:
        flipped = _run_padded(run_batch, flip_width(inputs), batch_size, pad_batches, map_shape)
        heatmaps = fuse_flip(heatmaps, flipped, config.flip_pairs)
    decoded = decode_heatmaps(heatmaps, np.stack([s.center for s in chunk]), np.stack([s.scale for s in chunk]), config)
    return {"preds": decoded.preds, "maxvals": decoded.maxvals}


def merge_batches(samples: Sequence[TopDownSample], records: Sequence[dict[str, np.ndarray]],
                  config: TopDownConfig) -> PersonPredictions:
    """The per-person predictions of a pass from its batch records, in ``topdown_batches`` order."""
    preds = np.zeros((len(samples), config.num_joints, 2), dtype=np.float32)
    maxvals = np.zeros((len(samples), config.num_joints, 1), dtype=np.float32)
    start = 0
    for record in records:
        stop = start + len(record["preds"])
        preds[start:stop], maxvals[start:stop] = record["preds"], record["maxvals"]
        start = stop
    if start != len(samples):
        raise ValueError(f"batch records cover {start} persons, the pass has {len(samples)}")
    return PersonPredictions.from_samples(samples, preds, maxvals)


def predict_topdown(
    dataset: CocoKeypointDataset,
    samples: Sequence[TopDownSample],
    run_batch: RunBatch,
    config: TopDownConfig,
    *,
    batch_size: int,
    image_ids: Sequence[int],
    flip_test: bool = True,
    pad_batches: bool = True,
    progress: ProgressCallback | None = None,
    store: BatchStore | None = None,
) -> PersonPredictions:
    """Decoded poses of ``samples`` (which must come from ``image_ids``, in that order)."""
    batches = topdown_batches(samples, batch_size)
    image_position = {image_id: position for position, image_id in enumerate(image_ids)}
    images = ImageCache(dataset)
    started = time.perf_counter()
    records = []
    for key, batch in batches:
        def decode_chunk(chunk: Sequence[TopDownSample] = samples[batch]) -> dict[str, np.ndarray]:
            return decode_batch(dataset, chunk, run_batch, config, batch_size=batch_size, flip_test=flip_test,
                                pad_batches=pad_batches, images=images)

        records.append(store.cached(key, decode_chunk) if store is not None else decode_chunk())
        if progress is not None:
            progress(TopDownProgress(
                images_done=_images_completed(samples, batch.stop, image_position, len(image_ids)),
                images_total=len(image_ids), samples_done=batch.stop,
                samples_total=len(samples), elapsed_s=time.perf_counter() - started))
    return merge_batches(samples, records, config)


def plan_topdown(dataset: CocoKeypointDataset, config: TopDownConfig,
                 limit: int | None = None) -> tuple[list[int], list[TopDownSample]]:
    """The images a pass scores (the first ``limit`` of the annotation file) and their GT-box samples."""
    image_ids = first_image_ids(dataset.coco, limit)
    samples = build_topdown_samples(dataset.coco, config, image_ids)
    if not samples:
        raise ValueError(f"{dataset.annotation_path}: no usable person annotations in the "
                         f"{len(image_ids)} image(s) selected")
    return image_ids, samples


def score_topdown(dataset: CocoKeypointDataset, persons: PersonPredictions, config: TopDownConfig,
                  image_ids: Sequence[int], results_path: str | Path | None = None) -> tuple[dict[str, float], list]:
    """COCOeval stats of the pass's predictions (rescoring, OKS-NMS, one results json) and the results."""
    results = keypoint_results(persons, config)
    with tempfile.TemporaryDirectory(prefix="topdown-results-") as scratch:
        path = Path(results_path) if results_path is not None else Path(scratch) / "results.json"
        write_results_json(results, path)
        return evaluate_keypoints(dataset.coco, path, image_ids), results


def evaluate_topdown(
    dataset: CocoKeypointDataset,
    run_batch: RunBatch,
    *,
    batch_size: int,
    config: TopDownConfig = TopDownConfig(),
    limit: int | None = None,
    results_path: str | Path | None = None,
    flip_test: bool = True,
    pad_batches: bool = True,
    progress: ProgressCallback | None = None,
    store: BatchStore | None = None,
) -> TopDownEvaluation:
    """COCO keypoint AP of a top-down model on GT person boxes.

    ``limit`` evaluates only the first N images of the annotation file (COCOeval restricted to
    them). ``results_path`` keeps the results json (written atomically); by default it goes to a
    temporary folder. ``pad_batches`` zero-pads the last batch to ``batch_size`` so static-batch
    exports work; the padded rows are discarded.
    """
    started = time.perf_counter()
    image_ids, samples = plan_topdown(dataset, config, limit)
    persons = predict_topdown(dataset, samples, run_batch, config, batch_size=batch_size,
                              image_ids=image_ids, flip_test=flip_test, pad_batches=pad_batches,
                              progress=progress, store=store)
    stats, results = score_topdown(dataset, persons, config, image_ids, results_path)
    return TopDownEvaluation(stats=stats, results=results, image_ids=image_ids,
                             num_samples=len(samples), elapsed_s=time.perf_counter() - started)
