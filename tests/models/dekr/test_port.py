"""The hrnet_dekr / rescore ports: state_dict layout, deformable-conv semantics, goldens in eager."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tooling.models.dekr import DEFORM_VARIANTS, build_hrnet_dekr, build_rescore, strip_module_prefix
from tooling.models.dekr.deform_conv import deform_conv3x3, from_ascend_offset, to_ascend_offset
from tooling.models.dekr.network import CANONICAL_REGULAR_MATRIX, AdaptBlock
from tooling.seeded import apply_seeded_weights

pytestmark = [pytest.mark.dekr]

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "dekr"
GOLDEN = FIXTURES / "golden"


def read_state_dict_tsv(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype))
    return rows


def state_dict_layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


# --- layout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", DEFORM_VARIANTS)
def test_network_state_dict_matches_upstream_layout(variant: str) -> None:
    expected = read_state_dict_tsv("state_dict_hrnet_dekr.tsv")
    assert len(expected) == 2264
    assert state_dict_layout(build_hrnet_dekr(variant)) == expected


def test_network_parameter_count() -> None:
    assert sum(p.numel() for p in build_hrnet_dekr().parameters()) == 29_561_182


def test_rescore_state_dict_matches_upstream_layout() -> None:
    assert state_dict_layout(build_rescore()) == read_state_dict_tsv("state_dict_rescore.tsv")


def test_data_parallel_checkpoint_loads_strictly(seeded_dekr) -> None:
    checkpoint = {f"module.{key}": value for key, value in seeded_dekr.state.items()}
    model = build_hrnet_dekr()
    model.load_state_dict(strip_module_prefix(checkpoint), strict=True)
    assert torch.equal(model.offset_feature_layers[16][1].regular_matrix,
                       seeded_dekr.state["offset_feature_layers.16.1.regular_matrix"])


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown deformable-conv variant"):
        build_hrnet_dekr("torchvision")  # type: ignore[arg-type]


# --- deformable convolution semantics --------------------------------------------------------------

def bilinear_or_zero(image: np.ndarray, y: float, x: float) -> float:
    """Spec §a's bilinear0: zero beyond one pixel outside, out-of-image neighbours contribute 0."""
    height, width = image.shape
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        if 0 <= yy < height and 0 <= xx < width:
            total += (1 - abs(y - yy)) * (1 - abs(x - xx)) * image[yy, xx]
    return total


def literal_deform_conv(x: np.ndarray, weight: np.ndarray, offset: np.ndarray) -> np.ndarray:
    batch, channels, height, width = x.shape
    out = np.zeros((batch, weight.shape[0], height, width))
    for n, yo, xo in itertools.product(range(batch), range(height), range(width)):
        for i, j in itertools.product(range(3), range(3)):
            k = 3 * i + j
            y = yo - 1 + i + offset[n, 2 * k, yo, xo]
            x_ = xo - 1 + j + offset[n, 2 * k + 1, yo, xo]
            samples = np.array([bilinear_or_zero(x[n, c], y, x_) for c in range(channels)])
            out[n, :, yo, xo] += weight[:, :, i, j] @ samples
    return out


def test_deform_conv_matches_literal_definition() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    offset = 3 * torch.randn(1, 18, 5, 6, generator=generator, dtype=torch.float64)
    # Integer and exact-border displacements, where the zero-padding rule is easiest to get wrong.
    offset[0, :, 0, :] = torch.tensor([-1.0, 0.0, 1.0, 4.0, -4.0, 5.0])  # same for all 18 channels
    offset[0, 0::2, 1, 1] = torch.arange(9, dtype=torch.float64) - 5  # rows -1 .. H land exactly
    expected = literal_deform_conv(x.numpy(), weight.numpy(), offset.numpy())
    np.testing.assert_allclose(deform_conv3x3(x, weight, offset).numpy(), expected, atol=1e-12)


def test_zero_offset_is_a_plain_convolution() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 9, generator=generator)
    weight = torch.randn(5, 4, 3, 3, generator=generator)
    offset = torch.zeros(2, 18, 7, 9)
    torch.testing.assert_close(deform_conv3x3(x, weight, offset), F.conv2d(x, weight, padding=1))


def test_ascend_offset_layout_round_trips() -> None:
    offset = torch.randn(1, 18, 4, 5)
    offset27 = to_ascend_offset(offset)
    assert torch.equal(offset27[:, :9], offset[:, 1::2])  # x displacements first
    assert torch.equal(offset27[:, 9:18], offset[:, 0::2])
    assert torch.equal(offset27[:, 18:], torch.ones(1, 9, 4, 5))
    restored, mask = from_ascend_offset(offset27)
    assert torch.equal(restored, offset) and torch.equal(mask, offset27[:, 18:])


def test_adaptblock_with_identity_transform_samples_the_regular_grid() -> None:
    block = AdaptBlock().eval()
    with torch.no_grad():
        torch.nn.init.zeros_(block.transform_matrix_conv.weight)
        block.transform_matrix_conv.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))  # A = I
        torch.nn.init.zeros_(block.translation_conv.weight)
        block.translation_conv.bias.copy_(torch.tensor([0.5, -2.0]))
        x = torch.randn(1, 15, 6, 6)
        offset = block.sampling_offset(x)
    assert torch.equal(offset[:, 0::2], torch.full_like(offset[:, 0::2], 0.5))
    assert torch.equal(offset[:, 1::2], torch.full_like(offset[:, 1::2], -2.0))


def test_adaptblock_reads_its_regular_matrix_buffer() -> None:
    block = apply_seeded_weights(AdaptBlock())
    x = torch.randn(1, 15, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seeded = block.sampling_offset(x)
        block.regular_matrix.copy_(torch.tensor(CANONICAL_REGULAR_MATRIX))
        canonical = block.sampling_offset(x)
    assert not torch.allclose(seeded, canonical)


def test_variants_agree_in_eager(seeded_dekr) -> None:
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = seeded_dekr("grid_sample")(image)
        for variant in DEFORM_VARIANTS[1:]:
            for got, expected in zip(seeded_dekr(variant)(image), reference):
                assert torch.equal(got, expected), variant


def test_output_shapes_follow_stride_4(seeded_dekr) -> None:
    with torch.no_grad():
        heatmap, offset = seeded_dekr("grid_sample")(torch.zeros(2, 3, 32, 64))
    assert heatmap.shape == (2, 18, 8, 16) and offset.shape == (2, 34, 8, 16)


# --- goldens ---------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("variant", DEFORM_VARIANTS)
def test_adaptblock_golden(variant: str) -> None:
    golden = np.load(GOLDEN / "adaptblock_public.npz")
    block = apply_seeded_weights(AdaptBlock(deform_variant=variant))
    x = torch.from_numpy(golden["x"])
    with torch.no_grad():
        offset = block.sampling_offset(x)
        values = {"sampling_offset": offset, "deform_out": block.adapt_conv(x, offset), "out": block(x)}
    for name, value in values.items():
        np.testing.assert_allclose(value.numpy(), golden[name], rtol=0, atol=1e-5, err_msg=name)
