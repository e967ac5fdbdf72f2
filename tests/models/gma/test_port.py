"""The GMA port: state_dict layout, checkpoint loading, sampler semantics, the full-size golden's
input recipe and the per-iteration intermediates (a drifting port is reported by the first stage
that diverges; the golden gate checks both samplers against the goldens)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tooling.models.gma import SAMPLERS, build_gma
from tooling.models.gma.correlation import sample_gather, sample_grid_sample, window_offsets
from tooling.models.gma.network import convex_upsample
from tooling.models.gma.slice import SLICE, CHECKPOINT
from tooling.weights import CheckpointError, WeightsChoice, apply_weights

from .conftest import FIXTURES, GOLDEN

pytestmark = [pytest.mark.gma]

# Stages of the spec's §8 debug file in the order the forward pass computes them.
STAGES = ("fmap1", "fmap2", "cnet", "attention", "corr_it0", "motion_it0", "motion_global_it0",
          *(f"flow_low_it{i}" for i in range(6)))
STAGE_RTOL = 1e-4  # intermediates agree to ~1e-5 relative to each stage's range (spec §8)


def read_tsv() -> list[tuple[str, str, str]]:
    rows = [tuple(line.split("\t")) for line in (FIXTURES / "state_dict_gma.tsv").read_text().splitlines()]
    assert rows[0] == ("key", "shape", "dtype")
    return rows[1:]


def layout(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    return [(k, "x".join(map(str, v.shape)) or "()", str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()]


def run(model: torch.nn.Module, data, **kwargs) -> np.ndarray:
    with torch.inference_mode():
        return model.estimate(torch.from_numpy(data["image1"]), torch.from_numpy(data["image2"]), **kwargs).numpy()


def first_diverging_stage(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> str | None:
    """The earliest stage whose values leave the golden's by more than STAGE_RTOL of its range."""
    for stage in STAGES:
        reference = expected[f"dbg_{stage}"]
        bound = STAGE_RTOL * max(float(np.abs(reference).max()), 1e-6)
        if actual[stage].shape != reference.shape or float(np.abs(actual[stage] - reference).max()) > bound:
            return stage
    return None


# --- layout and checkpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_state_dict_matches_upstream_layout(sampler):
    expected = read_tsv()
    assert len(expected) == 185
    assert layout(build_gma(sampler)) == expected


def test_parameter_count_and_shared_norm():
    model = build_gma()
    assert sum(p.numel() for p in model.parameters()) == 5_879_873
    block = model.cnet.layer2[0]
    assert block.norm3 is block.downsample[1]  # one BatchNorm under both names, as upstream


def test_relative_position_index_buffer():
    rel_ind = build_gma().att.pos_emb.rel_ind
    assert rel_ind.dtype == torch.int64 and rel_ind.shape == (160, 160)
    assert int(rel_ind[0, 0]) == 159 and int(rel_ind[0, 159]) == 318 and int(rel_ind[159, 0]) == 0


def test_data_parallel_checkpoint_loads_strictly(tmp_path, seeded_gma):
    path = tmp_path / CHECKPOINT
    torch.save({f"module.{k}": v for k, v in seeded_gma.state.items()}, path)
    model = build_gma("gather")
    apply_weights(model, WeightsChoice(path), SLICE, "gma", ())
    assert all(torch.equal(v, seeded_gma.state[k]) for k, v in model.state_dict().items())


def test_checkpoint_missing_a_key_is_named(tmp_path, seeded_gma):
    path = tmp_path / CHECKPOINT
    state = {f"module.{k}": v for k, v in seeded_gma.state.items() if k != "att.pos_emb.rel_ind"}
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"gma-sintel.pth.*missing keys: att.pos_emb.rel_ind"):
        apply_weights(build_gma(), WeightsChoice(path), SLICE, "gma", ())


def test_unknown_variant_and_too_small_input_are_rejected():
    with pytest.raises(KeyError, match="no export variant 'einsum'"):
        SLICE.build_network("gma", "einsum")
    small = torch.zeros(1, 3, 120, 256)
    with pytest.raises(ValueError, match="at least 128 x 128.*120 x 256"):
        build_gma()(small, small)


# --- sampler and upsampling semantics ---------------------------------------------------------------

def bilinear_zero(image: np.ndarray, x: float, y: float) -> float:
    """Plain bilinear interpolation at pixel (x, y); corners outside the image contribute 0."""
    height, width = image.shape
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    total = 0.0
    for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= cx < width and 0 <= cy < height:
            total += (1 - abs(x - cx)) * (1 - abs(y - cy)) * image[cy, cx]
    return total


@pytest.mark.parametrize("sample", [sample_grid_sample, sample_gather], ids=["grid_sample", "gather"])
def test_samplers_interpolate_with_zero_outside(sample):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, 5, 7, generator=g)
    # Inside, on edges, half a pixel and several pixels outside, exactly on pixel centres.
    points = torch.stack([torch.rand(2, 4, 6, generator=g) * 13 - 3, torch.rand(2, 4, 6, generator=g) * 11 - 3], -1)
    points[0, 0, :3] = torch.tensor([[0.0, 0.0], [6.0, 4.0], [-1.0, 2.0]])
    actual = sample(image, points).numpy()
    expected = np.array([[[[bilinear_zero(image[n, 0].numpy(), *points[n, i, j].tolist()) for j in range(6)]
                           for i in range(4)]] for n in range(2)])
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_gather_sampler_indexes_in_integers_so_fp16_arithmetic_fetches_the_right_cells():
    """ATC runs float arithmetic in fp16 (the guide's precision), where integers past 2048 are not
    all representable: a 60 x 60 map (62 x 62 padded, flat indices up to 3843) sampled on pixel
    centres in half precision must read exactly the cells float32 reads. A flat index computed in
    float and then cast (the first port) read a neighbour for every odd index past 2048; on the
    fake ATC's fp16 OM of GMA at 440 x 1024 that moved the flow by up to 10 px (0.64 px after)."""
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 60, 60, generator=g).half()
    rows, cols = torch.meshgrid(torch.arange(30.0, 60.0), torch.arange(0.0, 60.0), indexing="ij")
    points = torch.stack([cols, rows], -1)[None]  # x, y: rows 30-59 lie past flat index 2048
    in_half = sample_gather(image, points.half()).float()
    in_float = sample_gather(image.float(), points)
    assert torch.equal(in_half, in_float)
    assert torch.equal(in_float[0, 0], image.float()[0, 0, 30:])


def test_window_moves_x_along_the_slow_channel_index():
    offsets = window_offsets(4)
    assert offsets[0, 8].tolist() == [-4.0, 4.0]  # channel (a+4)*9 + (b+4) = 8: x offset -4, y offset +4
    assert offsets[8, 0].tolist() == [4.0, -4.0]


def test_convex_upsampling_of_a_constant_flow_is_constant_inside():
    flow = torch.full((1, 2, 4, 5), 1.5)
    up = convex_upsample(flow, torch.randn(1, 576, 4, 5))
    assert up.shape == (1, 2, 32, 40)
    # Away from the border every neighbour is 8 * 1.5; at the border the zero padding pulls toward 0.
    torch.testing.assert_close(up[..., 8:24, 8:32], torch.full_like(up[..., 8:24, 8:32], 12.0))
    assert float(up[..., 0, 0].abs().max()) < 12.0


# --- goldens ------------------------------------------------------------------------------------------

def test_intermediates_match_stage_by_stage(seeded_gma):
    with np.load(GOLDEN / "gma_public.npz") as inputs, np.load(GOLDEN / "gma_public_intermediates.npz") as debug:
        record: dict[str, torch.Tensor] = {}
        run(seeded_gma(), inputs, record=record)
        stages = {k: v.numpy() for k, v in record.items()}
        assert first_diverging_stage(stages, dict(debug)) is None
        for iters in (1, 12):  # the iteration count is a parameter of the port
            np.testing.assert_allclose(run(seeded_gma(iters=iters), inputs), debug[f"dbg_out1_iters{iters}"], atol=5e-4)


def test_a_drifting_port_is_reported_at_its_first_diverging_stage(seeded_gma):
    """Zeroing gamma (the aggregator's weight) leaves everything up to the motion encoder intact."""
    model = seeded_gma()
    with torch.no_grad():
        model.update_block.aggregator.gamma.zero_()
    with np.load(GOLDEN / "gma_public.npz") as inputs, np.load(GOLDEN / "gma_public_intermediates.npz") as debug:
        record: dict[str, torch.Tensor] = {}
        run(model, inputs, record=record)
        assert first_diverging_stage({k: v.numpy() for k, v in record.items()}, dict(debug)) == "motion_global_it0"


def test_full_size_golden_inputs_are_rebuilt_from_the_real_frames():
    with np.load(GOLDEN / "gma_full_public.npz") as data:
        feeds = SLICE.golden_inputs(None, "gma", GOLDEN / "gma_full_public.npz", data)
    assert feeds["image1"].shape == feeds["image2"].shape == (1, 3, 440, 1024)
    np.testing.assert_array_equal(feeds["image1"][..., :2, :], np.repeat(feeds["image1"][..., 2:3, :], 2, axis=2))


def test_golden_whose_sums_disagree_is_rejected(tmp_path):
    with np.load(GOLDEN / "gma_full_public.npz") as data:
        tampered = {**dict(data), "image2_sum": np.float64(data["image2_sum"] + 1)}
    with pytest.raises(ValueError, match="image2 rebuilt from frame_0048.png sums to"):
        SLICE.golden_inputs(None, "gma", tmp_path / "tampered.npz", tampered)


# --- upstream builder ---------------------------------------------------------------------------------

def test_upstream_builder_answers_as_the_export(tmp_path):
    """On a stand-in laid out as upstream is (core/network.py importing its siblings by plain
    name): the guide's namespace goes in, and the call returns test_mode's upsampled flow at 6
    iterations, with upstream's state_dict keys untouched."""
    from tooling.sources import UpstreamCheckout

    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "gma.py").write_text("SCALE = 3.0\n")
    (tmp_path / "core" / "network.py").write_text(
        "import torch\n"
        "from gma import SCALE\n\n\n"
        "class RAFTGMA(torch.nn.Module):\n"
        "    def __init__(self, args):\n"
        "        super().__init__()\n"
        "        assert (args.num_heads, args.position_only, args.position_and_content, args.mixed_precision) == "
        "(1, False, False, False)\n"
        "        assert 'dropout' not in args\n"
        "        self.fnet = torch.nn.Conv2d(3, 2, 1)\n\n"
        "    def forward(self, image1, image2, iters=12, flow_init=None, upsample=True, test_mode=False):\n"
        "        up = image1[:, :2] * iters * SCALE + image2[:, :2]\n"
        "        return (up[..., ::8, ::8], up) if test_mode else [up] * iters\n"
    )
    model = SLICE.build_upstream_network("gma", UpstreamCheckout(tmp_path, "0" * 40))
    assert list(model.state_dict()) == ["fnet.weight", "fnet.bias"]
    image1, image2 = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(model(image1, image2), image1[:, :2] * 18.0 + image2[:, :2])
