"""Tiled VAE decoding: exact in time, exact in size, blended in space, deterministic plans."""

import random

import pytest
import torch
import torch.nn.functional as F

from mochi_xdit.mochi.demo import DEMO_VAE_CONFIG, random_vae_state_dict
from mochi_xdit.mochi.vae import FrameGroupNorm, MochiVAEDecoder, VAEDecoderConfig
from mochi_xdit.mochi.vae_tiling import (
    TileAssembler,
    TileSpec,
    assemble_tiles,
    axis_spans,
    decode_tile,
    decode_tiled,
    estimate_tile_peak_bytes,
    plan_tiles,
)


@pytest.fixture(scope="module")
def decoder():
    model = MochiVAEDecoder(DEMO_VAE_CONFIG)
    model.load_state_dict(random_vae_state_dict(DEMO_VAE_CONFIG, seed=0), strict=True)
    return model.eval()


def latent(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- time: chunks that carry causal context ---------------------------------------------------


@pytest.mark.parametrize(
    "T,chunk", [(7, 1), (7, 2), (7, 3), (7, 4), (7, 5), (7, 7), (7, 10), (1, 1), (2, 1), (4, 3)]
)
def test_chunked_decode_equals_full_decode(decoder, T, chunk):
    """Chunks of k latent frames (k dividing T or not) give the full decode's 6T - 5 frames."""
    z = latent(2 if T == 4 else 1, 12, T, 3, 5, seed=T * 10 + chunk)
    full = decoder.decode(z)
    (tile,) = plan_tiles(z.shape, TileSpec(tile_height=64, tile_width=64, overlap=0, frame_chunk=chunk))
    chunked = decode_tile(decoder, z, tile)
    assert chunked.shape == full.shape == (z.shape[0], 3, 6 * T - 5, 24, 40)
    err = (chunked - full).abs().max().item()
    assert err <= 1e-5, f"chunk {chunk}: max abs error {err:.3g} vs one full decode"


def test_decode_chunk_returns_first_and_later_frame_counts(decoder):
    z = latent(1, 12, 5, 2, 2)
    first, carried = decoder.decode_chunk(z[:, :, :2])
    second, carried = decoder.decode_chunk(z[:, :, 2:], carried)
    assert first.shape[2] == 6 * 2 - 5 and second.shape[2] == 6 * 3
    assert (torch.cat([first, second], dim=2) - decoder.decode(z)).abs().max().item() <= 1e-5


def test_group_norm_statistics_are_per_frame():
    """Why chunking is exact: each frame is normalised on its own, so a frame's output does not
    change with the other frames (and equals torch's GroupNorm on that frame)."""
    norm = FrameGroupNorm(32, groups=8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = latent(2, 32, 5, 6, 7)
    out = norm(x)
    for t in range(5):
        alone = F.group_norm(x[:, :, t], 8, norm.weight, norm.bias, norm.eps)
        assert torch.equal(out[:, :, t], alone)
    changed = x.clone()
    changed[:, :, 3] *= 10
    assert torch.equal(norm(changed)[:, :, [0, 1, 2, 4]], out[:, :, [0, 1, 2, 4]])


# --- space: plan, placement, blend ------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 31, 32, 33, 55, 56, 79, 80, 106, 200])
@pytest.mark.parametrize("tile,overlap", [(32, 8), (16, 4), (5, 2), (8, 0), (12, 6)])
def test_axis_spans_cover_the_axis_with_equal_tiles_and_the_overlap(length, tile, overlap):
    spans = axis_spans(length, tile, overlap)
    assert spans == axis_spans(length, tile, overlap)  # deterministic
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(tile, length) for start, end in spans)
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start < next_start <= end - overlap  # ordered, overlapping by at least `overlap`
    # no more tiles than needed: one fewer would leave a gap or a smaller overlap
    n = len(spans)
    assert n == 1 or (n - 2) * (tile - overlap) + tile < length


def test_plan_tiles_is_row_major_and_each_tile_knows_its_grid():
    spec = TileSpec(tile_height=16, tile_width=20, overlap=4, frame_chunk=3)
    tiles = plan_tiles((1, 12, 5, 33, 47), spec)
    assert tiles == plan_tiles((1, 12, 5, 33, 47), spec)
    rows, cols = axis_spans(33, 16, 4), axis_spans(47, 20, 4)
    assert len(tiles) == len(rows) * len(cols)
    for tile in tiles:
        assert (tile.rows, tile.cols) == (rows[tile.row], cols[tile.col])
        assert tile.index == tile.row * len(cols) + tile.col and tile.frame_chunk == 3


class LocalStubDecoder:
    """A decoder with no spatial context (each latent pixel becomes an 8x8 block of its first 3
    channels, each latent frame 6 frames, the first chunk dropping 5), so a correct tiled decode
    must reproduce its untiled output exactly: any misplaced or mis-weighted pixel shows."""

    config = VAEDecoderConfig(channels=(8, 8, 8, 8), norm_groups=8)

    def check_latent(self, latent):
        MochiVAEDecoder.check_latent(self, latent)

    def decode_chunk(self, latent, carried=None):
        x = latent[:, :3].repeat_interleave(6, dim=2).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        return (x[:, :, 5:] if carried is None else x), []


@pytest.mark.parametrize("H,W", [(1, 1), (7, 5), (13, 19), (33, 17), (40, 81), (64, 64)])
@pytest.mark.parametrize(
    "spec", [TileSpec(4, 4, 1, 1), TileSpec(5, 3, 1, 2), TileSpec(8, 8, 3, 2), TileSpec(12, 16, 6, 3), TileSpec()]
)
def test_tiled_decode_places_and_blends_tiles_exactly(H, W, spec):
    stub = LocalStubDecoder()
    z = latent(1, 12, 3, H, W, seed=H * W)
    expected, _ = stub.decode_chunk(z)
    video = decode_tiled(stub, z, spec)
    assert video.shape == (1, 3, 13, 8 * H, 8 * W)
    assert (video - expected).abs().max().item() <= 1e-6


def test_decode_tile_equals_an_untiled_decode_of_its_latent_patch(decoder):
    z = latent(1, 12, 4, 9, 13, seed=3)
    tiles = plan_tiles(z.shape, TileSpec(tile_height=6, tile_width=8, overlap=2, frame_chunk=3))
    tile = next(tile for tile in tiles if tile.row > 0 and tile.col > 0)  # cut on two sides at least
    (y0, y1), (x0, x1) = tile.rows, tile.cols
    expected = decoder.decode(z[:, :, :, y0:y1, x0:x1])
    got = decode_tile(decoder, z, tile)
    assert got.shape == (1, 3, 19, 8 * (y1 - y0), 8 * (x1 - x0))
    assert (got - expected).abs().max().item() <= 1e-5


def test_tiled_decode_stays_close_to_untiled_at_the_default_overlap(decoder):
    """Spatial tiling is an approximation (GroupNorm statistics over a tile instead of the whole
    frame; replicate padding at cut edges). With the default TileSpec (32x32 latent px, overlap 8,
    the tile side / 4 that TileSpec.auto also uses) on an odd, non-square grid, the random demo
    decoder (output std ~1.08, max |x| ~9.5) measured max 0.29 / mean 0.020 (seed 0). A tile
    shifted by one latent px measured max 9.8 / mean 0.18, cutting at mid-overlap without a ramp
    max 0.34 / mean 0.020, the ramp over the whole overlap (edge pixels weighted) max 0.70 / mean
    0.027. The bounds (max 0.5, mean 0.03) sit above the measured error and far below a placement
    error."""
    z = latent(1, 12, 1, 55, 79, seed=0)
    full = decoder.decode(z)
    tiled = decode_tiled(decoder, z, TileSpec())
    assert len(plan_tiles(z.shape, TileSpec())) == 6
    assert tiled.shape == full.shape == (1, 3, 1, 440, 632)
    diff = (tiled - full).abs()
    max_err, mean_err = diff.max().item(), diff.mean().item()
    assert max_err <= 0.5 and mean_err <= 0.03, f"tiled vs untiled: max {max_err:.3g}, mean {mean_err:.3g}"


# --- assembly for several ranks ---------------------------------------------------------------


def test_tiles_assembled_in_any_order_or_from_several_ranks_give_the_same_video(decoder):
    z = latent(1, 12, 3, 11, 14, seed=5)
    spec = TileSpec(tile_height=6, tile_width=6, overlap=2, frame_chunk=2)
    tiles = plan_tiles(z.shape, spec)
    decoded = [(tile, decode_tile(decoder, z, tile)) for tile in tiles]
    reference = decode_tiled(decoder, z, spec)
    shuffled = decoded[:]
    random.Random(0).shuffle(shuffled)
    assert torch.equal(assemble_tiles(tiles, shuffled), reference)
    for world in (2, 3):  # rank r decodes tiles r, r + world, ...; rank 0 gathers them rank by rank
        gathered = [pair for rank in range(world) for pair in decoded[rank::world]]
        assert torch.equal(assemble_tiles(tiles, gathered), reference)


def test_assembler_rejects_duplicates_foreign_and_missing_tiles(decoder):
    z = latent(1, 12, 1, 6, 6)
    tiles = plan_tiles(z.shape, TileSpec(4, 4, 1, 1))
    other = plan_tiles((1, 12, 1, 9, 9), TileSpec(4, 4, 1, 1))
    pixels = decode_tile(decoder, z, tiles[0])
    assembler = TileAssembler(tiles)
    assembler.add(tiles[0], pixels)
    with pytest.raises(ValueError, match="added twice"):
        assembler.add(tiles[0], pixels)
    with pytest.raises(ValueError, match="not from this plan"):
        assembler.add(other[1], pixels)
    with pytest.raises(ValueError, match=r"tiles \[1, 2, 3\] were never added"):
        assembler.result()


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tile_height=0), "tile size"),
        (dict(overlap=17), "half the tile side"),
        (dict(overlap=-1), "half the tile side"),
        (dict(frame_chunk=0), "frame_chunk"),
    ],
)
def test_tile_spec_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TileSpec(**kwargs)


def test_tile_spec_auto_picks_the_largest_tile_that_fits():
    config = VAEDecoderConfig()
    shape = (1, 12, 28, 60, 106)  # 848x480, 163 frames
    specs = {gib: TileSpec.auto(gib * 2**30, config, latent_shape=shape) for gib in (2, 4, 24, 80)}
    for gib, spec in specs.items():
        need = estimate_tile_peak_bytes(
            config, min(spec.tile_height, 60), min(spec.tile_width, 106), spec.frame_chunk, 28, torch.bfloat16
        )
        assert need <= 0.8 * gib * 2**30
        assert spec.overlap == spec.tile_height // 4 and spec.tile_height == spec.tile_width
    sizes = [min(s.tile_height, 60) * min(s.tile_width, 106) * s.frame_chunk for s in specs.values()]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert len(plan_tiles(shape, specs[80])) == 1  # enough memory: the whole frame is one tile
    with pytest.raises(ValueError, match="not enough"):
        TileSpec.auto(2**20, config)


def test_tiled_decode_runs_on_meta_tensors():
    """No tensor values are read on the decode path (chunks, tiles, blend), so memory can be
    counted on fake / meta tensors; the real decoder goes through the same ops as the demo one."""
    with torch.device("meta"):
        demo = MochiVAEDecoder(DEMO_VAE_CONFIG)
        real = MochiVAEDecoder(VAEDecoderConfig())
        z = torch.empty(1, 12, 3, 12, 20)
    video = decode_tiled(demo, z, TileSpec(tile_height=8, tile_width=8, overlap=2, frame_chunk=2))
    assert video.shape == (1, 3, 13, 96, 160) and video.device.type == "meta"
    assert real.decode(z[:, :, :1, :4, :6]).shape == (1, 3, 1, 32, 48)


# -- conv3d settings (memory format, cuDNN autotuner): measured on a GPU, default elsewhere --------


def test_channels_last_decoder_decodes_the_same_video(decoder):
    from mochi_xdit.mochi.vae_conv import ConvSettings, apply_memory_format

    latent = torch.randn(1, 12, 3, 4, 6, generator=torch.Generator().manual_seed(8))
    expected = decoder.decode(latent)
    fast = apply_memory_format(MochiVAEDecoder(decoder.config).eval(), ConvSettings(channels_last=True))
    fast.load_state_dict(decoder.state_dict())
    assert fast.blocks[1].blocks[0].stack[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    with ConvSettings(True, True).active(), torch.no_grad():
        assert torch.backends.cudnn.benchmark
        video = fast.decode(latent)
    assert not torch.backends.cudnn.benchmark  # restored
    assert (video - expected).abs().max().item() <= 1e-5


def test_conv_settings_are_the_fastest_measured_and_the_default_off_cuda():
    from mochi_xdit.mochi.vae_conv import ALL_CONV_SETTINGS, ConvSettings, fastest, measure_conv_settings, time_conv3d

    timings = dict(zip(ALL_CONV_SETTINGS, (0.30, 0.25, 0.20, 0.22)))  # (layout, tuned): FF, FT, TF, TT
    assert fastest(timings) == ConvSettings(channels_last=True, cudnn_benchmark=False)
    assert fastest(dict.fromkeys(ALL_CONV_SETTINGS, 0.1)) == ConvSettings()  # a tie keeps the default
    assert measure_conv_settings((1, 8, 4, 10, 10), torch.float32, torch.device("cpu")) == (ConvSettings(), {})
    assert time_conv3d(ConvSettings(True, False), (1, 8, 4, 10, 10), torch.float32, torch.device("cpu"), 1) > 0
