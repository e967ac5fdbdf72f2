"""Bad-input probes for every reader of the suite: a damaged input is a clear error, never a pass.

Each ``Reader`` below writes a small *valid* input, reads it through the suite's own reader, and
names the error types a damaged input must raise. Every file role of a reader gets the generic
damages (``missing``, ``empty``, ``truncated`` to 60 %, ``garbage`` text); ``specific`` adds the
damages only that format can suffer (flipped bytes in a CRC-checked archive, wrong type, missing
part, NaN), each with a regex the message must match. For every probe the error must name the
damaged file and say more than its name. ``check`` holds what the reader returns for the valid
input against what ``write`` wrote (counts, ids, shapes, values), which keeps the probes honest: a
reader that fails on good input, or reads it wrong, fails ``test_valid_input_reads``.

Adding a reader (a new model's dataset format, e.g. GMA's ``.flo`` flow files and Sintel PNGs, or
FOMM's mp4 videos) takes a few lines: write a ``_write_<format>(folder) -> {role: path}`` function
producing a tiny valid input, then append

    Reader("sintel-flo", roles=("flow",), write=_write_flo,
           read=lambda files: read_flo(files["flow"]), errors=(FlowFormatError,),
           check=lambda files, flow: np.testing.assert_array_equal(flow, FLOW),
           specific={"wrong-magic": ("flow", _overwrite(0, b"XXXX"), "magic"),
                     "nan": ("flow", _nan_flow, "NaN")})

to ``READERS``. Generic damages that a format cannot detect by design (a JPEG with flipped bytes
decodes to other pixels) are left out through ``generic``. Damage that only shows when outputs are
compared (NaN in a golden) is probed in ``test_comparisons.py``; cache entries, upstream checkouts
and stale resumes, which must *recover*, in ``test_cache_faults.py`` and ``test_stale_results.py``.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import torch

from tooling.arrays import ArrayFileError, read_arrays
from tooling.coco.dataset import CocoFormatError, ImageReadError, load_coco, read_image
from tooling.coco.synthetic import write_synthetic_coco
from tooling.models.fomm.video import VideoError, read_clip, write_mp4
from tooling.models.gma.flo import FloError, read_flo, write_flo
from tooling.models.gma.sintel import SintelLayoutError, read_frame
from tooling.models.videopose3d.human36m import DatasetError, load_test_sequences
from tooling.slice import ModelSlice
from tooling.weights import CheckpointError, WeightsChoice, apply_weights

Files = dict[str, Path]
Damage = Callable[[Path], None]


@dataclass(frozen=True)
class Reader:
    name: str
    roles: tuple[str, ...]  # the files one input consists of
    write: Callable[[Path], Files]  # writes a small valid input below the folder
    read: Callable[[Files], Any]  # reads it through the suite's reader
    errors: tuple[type[BaseException], ...]  # what a damaged input must raise
    check: Callable[[Files, Any], None]  # asserts that what was read is what write() wrote
    specific: dict[str, tuple[str, Damage, str]] = field(default_factory=dict)  # variant: (role, damage, regex)
    generic: tuple[str, ...] = ("missing", "empty", "truncated", "garbage")


# -- generic damages -------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


GENERIC: dict[str, Damage] = {
    "missing": lambda path: path.unlink(),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncate,
    "garbage": lambda path: path.write_text("this is a text file, not the input the suite expects\n" * 3),
}


def _flip_in_member(member: str | None = None) -> Damage:
    """Flip bytes in the middle of a zip member's stored data (the largest member by default)."""

    def damage(path: Path) -> None:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            info = next(i for i in infos if i.filename.endswith(member)) if member else max(infos, key=lambda i: i.compress_size)
        data = bytearray(path.read_bytes())
        name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
        extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
        start = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        for i in range(start, start + 4):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))

    return damage


# -- checkpoints -----------------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)


def _state(**changes) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.rand(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in TinyNet().state_dict().items()}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def _write_checkpoint(folder: Path) -> Files:
    path = folder / "net.pth"
    torch.save({"epoch": 3, "state_dict": _state()}, path)
    return {"checkpoint": path}


def _resave(**changes) -> Damage:
    return lambda path: torch.save({"state_dict": _state(**changes)}, path)


def _read_checkpoint(files: Files) -> TinyNet:
    model = TinyNet()
    apply_weights(model, WeightsChoice(files["checkpoint"]), ModelSlice(), "net", ("state_dict",))
    return model


def _check_checkpoint(files: Files, model: TinyNet) -> None:
    loaded, saved = model.state_dict(), _state()
    assert list(loaded) == list(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


# -- Human3.6M --------------------------------------------------------------------------------------
H36M_ENTRIES = {"S9": {"Walking": 12, "Eating 1": 9}, "S11": {"Walking": 10}}


def _h36m(entries=H36M_ENTRIES, drop_3d=(), nan_3d=False, nan_2d=False, cameras=4):
    rng = np.random.default_rng(0)
    p3 = {s: {e: rng.uniform(-1, 1, (t, 32, 3)).astype(np.float32) for e, t in es.items() if e not in drop_3d}
          for s, es in entries.items()}
    p2 = {s: {e: [rng.uniform(0, 1000, (t, 17, 2)).astype(np.float32) for _ in range(cameras)] for e, t in es.items()}
          for s, es in entries.items()}
    if nan_3d:
        p3["S9"]["Walking"][4, 7, 1] = np.nan
    if nan_2d:
        p2["S11"]["Walking"][2][3, 5, 0] = np.nan
    return p3, p2


def _write_h36m(folder: Path, **kw) -> Files:
    p3, p2 = _h36m(**kw)
    files = {"3d": folder / "data_3d_h36m.npz", "2d": folder / "data_2d_h36m_cpn_ft_h36m_dbb.npz"}
    np.savez(files["3d"], positions_3d=p3)
    np.savez_compressed(files["2d"], positions_2d=p2, metadata={"layout_name": "h36m"})
    return files


def _check_h36m(files: Files, sequences) -> None:
    """One sequence per camera of every written entry, numbered as the guide numbers them, with
    the entry's frame count and 17 joints."""
    by_action = [("S9", "Walking"), ("S11", "Walking"), ("S9", "Eating 1")]  # actions in order of first appearance
    assert [(s.subject, s.entry, s.camera) for s in sequences] == [(s, e, c) for s, e in by_action for c in range(4)]
    assert [s.stem for s in sequences] == [f"{k:03d}_{s.action}" for k, s in enumerate(sequences, 1)]
    for s in sequences:
        frames = H36M_ENTRIES[s.subject][s.entry]
        assert s.keypoints_2d.shape == (frames, 17, 2) and s.positions_3d.shape == (frames, 17, 3)
        assert np.isfinite(s.keypoints_2d).all() and np.isfinite(s.positions_3d).all()


def _rewrite_h36m(role: str, **kw) -> Damage:
    def damage(path: Path) -> None:
        p3, p2 = _h36m(**kw)
        if role == "3d":
            np.savez(path, positions_3d=p3)
        else:
            np.savez_compressed(path, positions_2d=p2, metadata={"layout_name": "h36m"})
    return damage


# -- COCO annotations and images ------------------------------------------------------------------
def _write_coco(folder: Path) -> Files:
    dataset = write_synthetic_coco(folder, seed=1, num_images=4, image_size=(96, 64))
    return {"annotations": dataset.annotation_path}


def _check_coco(files: Files, coco) -> None:
    written = json.loads(files["annotations"].read_text())
    assert len(written["images"]) == 4
    assert sorted(coco.getImgIds()) == sorted(image["id"] for image in written["images"])
    assert {i: (v["width"], v["height"]) for i, v in coco.imgs.items()} == {i: (96, 64) for i in coco.getImgIds()}
    assert sorted(coco.getAnnIds()) == sorted(a["id"] for a in written["annotations"])
    for annotation in written["annotations"]:
        assert coco.anns[annotation["id"]]["keypoints"] == annotation["keypoints"]
    assert coco.getCatIds() == [1]


def _edit_coco(edit: Callable[[dict], None]) -> Damage:
    """Change the parsed annotations in place and write them back (NaN as the bare token json reads)."""

    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return damage


def _wrap_in_list(path: Path) -> None:
    path.write_text(json.dumps([json.loads(path.read_text())]))


def _set_first_annotation(key: str, value) -> Callable[[dict], None]:
    return lambda data: data["annotations"][0].__setitem__(key, value)


def _smooth_image(height: int, width: int, shift: int = 0) -> np.ndarray:
    """Gradients: what a lossy codec (JPEG, mp4) keeps to within a few levels, unlike noise."""
    y, x = np.mgrid[0:height, 0:width] + shift
    return np.stack([x * 3, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)


IMAGE = _smooth_image(48, 64)  # BGR, as OpenCV writes and read_image returns it


def _write_image(suffix: str, role: str = "image") -> Callable[[Path], Files]:
    def write(folder: Path) -> Files:
        path = folder / f"000000000042{suffix}"
        cv2.imwrite(str(path), IMAGE)
        return {role: path}
    return write


def _check_pixels(expected: np.ndarray, lossy: bool) -> Callable[[Files, np.ndarray], None]:
    def check(files: Files, image: np.ndarray) -> None:
        assert image.shape == expected.shape and image.dtype == expected.dtype
        if lossy:
            # mp4v loses ~2.5 levels on average here, JPEG ~0.6; a frame out of order ~9
            assert np.abs(image.astype(int) - expected.astype(int)).mean() < 5.0
        else:
            np.testing.assert_array_equal(image, expected)
    return check


# -- goldens ----------------------------------------------------------------------------------------
GOLDEN_ARRAYS = {
    "x": np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32),
    "y": np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32),
}


def _write_golden(folder: Path) -> Files:
    path = folder / "golden.npz"
    np.savez(path, **GOLDEN_ARRAYS)
    return {"golden": path}


def _check_golden(files: Files, arrays: dict[str, np.ndarray]) -> None:
    assert list(arrays) == list(GOLDEN_ARRAYS)
    for name, value in GOLDEN_ARRAYS.items():
        assert arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(arrays[name], value)


# -- GMA: Sintel flow and frames; FOMM: mp4 clips ------------------------------------------------------
FLOW = np.random.default_rng(4).standard_normal((6, 8, 2)).astype(np.float32)


def _write_flo(folder: Path) -> Files:
    path = folder / "frame_0001.flo"
    write_flo(path, FLOW)
    return {"flow": path}


def _overwrite(offset: int, data: bytes) -> Damage:
    def damage(path: Path) -> None:
        content = bytearray(path.read_bytes())
        content[offset: offset + len(data)] = data
        path.write_bytes(bytes(content))
    return damage


def _nan_flow(path: Path) -> None:
    flow = read_flo(path)
    flow[2, 3, 1] = np.nan
    write_flo(path, flow)


CLIP = np.stack([_smooth_image(64, 64, shift=4 * t) for t in range(12)])  # RGB, moving 4 px a frame


def _write_mp4(folder: Path) -> Files:
    path = folder / "clip.mp4"
    write_mp4(path, CLIP)
    return {"clip": path}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


READERS = [
    Reader(
        "checkpoint", ("checkpoint",), _write_checkpoint, _read_checkpoint, (CheckpointError,), _check_checkpoint,
        specific={
            "flipped-tensor-bytes": ("checkpoint", _flip_in_member("data/0"), "CRC"),
            "int64-where-float": ("checkpoint", _resave(**{"conv.weight": torch.ones(4, 2, 3, 3, dtype=torch.int64)}),
                                  r"dtype mismatch.*conv\.weight"),
            "missing-tensor": ("checkpoint", _resave(**{"norm.bias": None}), r"missing keys: norm\.bias"),
            "nan-weights": ("checkpoint", _resave(**{"conv.bias": torch.tensor([0.0, float("nan"), 1.0, 2.0])}),
                            r"NaN or Inf: conv\.bias"),
            "wrong-type-list": ("checkpoint", lambda p: torch.save([torch.zeros(2)], p), "no state_dict"),
            "json-file": ("checkpoint", lambda p: p.write_text(json.dumps({"conv.weight": [1, 2]})), "not a readable"),
            "random-bytes": ("checkpoint", lambda p: p.write_bytes(np.random.default_rng(5).bytes(4096)),
                             "not a readable"),
        },
    ),
    Reader(
        "human36m", ("3d", "2d"), _write_h36m, lambda f: load_test_sequences(f["3d"], f["2d"]), (DatasetError,),
        _check_h36m,
        specific={
            "3d-flipped-bytes": ("3d", _flip_in_member(), "not a readable"),
            "2d-flipped-bytes": ("2d", _flip_in_member(), "not a readable"),
            "3d-missing-action": ("3d", _rewrite_h36m("3d", drop_3d=("Eating 1",)), r"lacks 1 action.*Eating 1"),
            "3d-nan": ("3d", _rewrite_h36m("3d", nan_3d=True), r"S9\]\[Walking\].*NaN"),
            "2d-nan": ("2d", _rewrite_h36m("2d", nan_2d=True), r"S11 / Walking camera 2.*NaN"),
            "2d-missing-camera": ("2d", _rewrite_h36m("2d", cameras=3), "has 3 cameras"),
            "3d-wrong-type": ("3d", lambda p: np.savez(p, positions_3d=np.zeros((3, 32, 3))), "expected a dict"),
            "3d-zero-frames": ("3d", _rewrite_h36m("3d", entries={**H36M_ENTRIES, "S11": {"Walking": 0}}),
                               "no frames"),
            "3d-no-actions": ("3d", lambda p: np.savez(p, positions_3d={"S9": {}, "S11": {}}), "holds no actions"),
        },
    ),
    Reader(
        "coco-annotations", ("annotations",), _write_coco, lambda f: load_coco(f["annotations"]), (CocoFormatError,),
        _check_coco,
        specific={
            "top-level-list": ("annotations", _wrap_in_list, "top level is a list"),
            "no-annotations": ("annotations", _edit_coco(lambda d: d.__delitem__("annotations")), "'annotations' must be a list"),
            "annotation-without-keypoints": ("annotations", _edit_coco(lambda d: d["annotations"][0].__delitem__("keypoints")),
                                             "lacks field.*keypoints"),
            "nan-bbox": ("annotations", _edit_coco(_set_first_annotation("bbox", [1.0, float("nan"), 5.0, 5.0])), "bbox"),
            "nan-keypoint": ("annotations", _edit_coco(lambda d: d["annotations"][0]["keypoints"].__setitem__(0, float("nan"))),
                             "not finite"),
            "dangling-image-id": ("annotations", _edit_coco(_set_first_annotation("image_id", -7)), "image_id -7"),
        },
    ),
    Reader("jpeg-image", ("image",), _write_image(".jpg"), lambda f: read_image(f["image"]),
           (ImageReadError, FileNotFoundError), _check_pixels(IMAGE, lossy=True)),
    Reader("png-image", ("image",), _write_image(".png"), lambda f: read_image(f["image"]),
           (ImageReadError, FileNotFoundError), _check_pixels(IMAGE, lossy=False)),
    Reader(
        "gma-flo", ("flow",), _write_flo, lambda f: read_flo(f["flow"]), (FloError,),
        lambda f, flow: np.testing.assert_array_equal(flow, FLOW),
        specific={
            "wrong-magic": ("flow", _overwrite(0, b"XXXX"), "magic"),
            "huge-header": ("flow", _overwrite(4, np.array([1 << 20], "<i4").tobytes()), "needs"),
            "nan": ("flow", _nan_flow, "NaN"),
        },
    ),
    Reader("sintel-png", ("frame",), _write_image(".png", role="frame"), lambda f: read_frame(f["frame"]),
           (SintelLayoutError,), _check_pixels(IMAGE[..., ::-1].transpose(2, 0, 1).astype(np.float32), lossy=False)),
    Reader("fomm-mp4", ("clip",), _write_mp4, lambda f: read_clip(f["clip"]), (VideoError,),
           _check_pixels(CLIP, lossy=True)),
    Reader(
        "golden", ("golden",), _write_golden, lambda f: read_arrays(f["golden"], ["x", "y"]), (ArrayFileError,),
        _check_golden,
        specific={
            "flipped-bytes": ("golden", _flip_in_member("x.npy"), "CRC"),
            "missing-array": ("golden", lambda p: np.savez(p, x=np.zeros(3)), r"lacks arrays \['y'\]"),
            "object-array": ("golden", lambda p: np.savez(p, x=np.zeros(3), y=np.array([{}], dtype=object)), "pickle"),
            "text-array": ("golden", lambda p: np.savez(p, x=np.zeros(3), y=np.array(["a"])), "expected numbers"),
            "npy-not-npz": ("golden", lambda p: p.write_bytes(_npy_bytes(np.zeros(3))), "single .npy array"),
        },
    ),
]


def _probes():
    for reader in READERS:
        for role in reader.roles:
            for kind in reader.generic:
                yield pytest.param(reader, role, GENERIC[kind], None, id=f"{reader.name}-{role}-{kind}")
        for variant, (role, damage, pattern) in reader.specific.items():
            yield pytest.param(reader, role, damage, pattern, id=f"{reader.name}-{variant}")


@pytest.mark.parametrize("reader", [pytest.param(r, id=r.name) for r in READERS])
def test_valid_input_reads(reader: Reader, tmp_path):
    files = reader.write(tmp_path)
    reader.check(files, reader.read(files))


@pytest.mark.parametrize(("reader", "role", "damage", "pattern"), list(_probes()))
def test_damaged_input_is_a_clear_error(reader: Reader, role: str, damage: Damage, pattern: str | None, tmp_path):
    files = reader.write(tmp_path)
    damage(files[role])
    with pytest.raises(reader.errors) as info:
        reader.read(files)
    message = str(info.value)
    assert files[role].name in message, f"the error does not name {files[role].name}: {message}"
    assert len(message) > len(str(files[role])) + 12, f"the error does not say what is wrong: {message}"
    if pattern:
        assert __import__("re").search(pattern, message), f"{message!r} does not match {pattern!r}"


@pytest.mark.parametrize("seed", range(24))
def test_fuzzed_checkpoint_is_an_error_or_loads_unchanged(tmp_path, seed):
    """Random byte flips and cuts anywhere in a checkpoint (headers, pickle, tensor data): the
    load either fails with a CheckpointError naming the file or yields exactly the saved values."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "net.pth"
    saved = _state()
    torch.save({"state_dict": saved}, path)
    data = bytearray(path.read_bytes())
    if seed % 3 == 0:
        data = data[: int(rng.integers(1, len(data)))]
    for position in rng.integers(0, len(data), int(rng.integers(1, 4))):
        data[position] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    loaded = TinyNet()
    try:
        apply_weights(loaded, WeightsChoice(path), ModelSlice(), "net", ("state_dict",))
    except CheckpointError as exc:
        assert path.name in str(exc)
        return
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} changed without an error"
