"""Tiled VAE encoding: spatial tiles (whole video in time), blended at latent resolution."""

import random

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_VAE_ENCODER_CONFIG, random_vae_encoder_state_dict
from mochi_xdit.mochi.vae_encoder import MochiVAEEncoder, VAEEncoderConfig
from mochi_xdit.mochi.vae_encoder_tiling import (EncodeTileSpec, encode_tile, encode_tiled,
                                                 estimate_encode_tile_peak_bytes, plan_encode_tiles)
from mochi_xdit.mochi.vae_tiling import assemble_tiles


@pytest.fixture(scope="module")
def encoder():
    model = MochiVAEEncoder(DEMO_VAE_ENCODER_CONFIG)
    model.load_state_dict(random_vae_encoder_state_dict(DEMO_VAE_ENCODER_CONFIG, seed=0))
    return model.eval()


def smooth_video(F, H, W, seed):
    """A video with image-like structure (coarse noise, trilinear upsampling) in [-1, 1]."""
    coarse = torch.rand(1, 3, F, H // 32 + 2, W // 32 + 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(F, H, W), mode="trilinear")


def test_plan_covers_the_latent_grid_and_each_tile_holds_all_frames():
    tiles = plan_encode_tiles((1, 3, 13, 128, 192), EncodeTileSpec(12, 12, 3), DEMO_VAE_ENCODER_CONFIG)
    assert [(t.rows, t.cols) for t in tiles[:3]] == [((0, 12), (0, 12)), ((0, 12), (6, 18)), ((0, 12), (12, 24))]
    assert len(tiles) == 6 and {t.frame_chunk for t in tiles} == {3}  # 13 frames -> 3 latent frames


def test_tile_equals_an_untiled_encode_of_its_pixels(encoder):
    video = smooth_video(7, 64, 96, seed=1)
    tile = plan_encode_tiles(video.shape, EncodeTileSpec(4, 6, 1), encoder.config)[4]
    (y0, y1), (x0, x1) = tile.rows, tile.cols
    assert torch.equal(encode_tile(encoder, video, tile), encoder.encode(video[..., y0 * 8 : y1 * 8, x0 * 8 : x1 * 8]))


def test_tiled_encode_stays_close_to_untiled_at_the_default_overlap(encoder):
    """Spatial tiling is an approximation (GroupNorm statistics over a tile instead of the whole
    frame; replicate padding at cut edges; time is never split). Measured with the random demo
    encoder (latent std ~0.55): 128x192 px, 7 frames, tiles 12x12 latent px with overlap 3 (the
    side / 4 rule of EncodeTileSpec.auto), 6 tiles: max 0.32 / mean 0.043 (seed 2; seeds 5, 6:
    max 0.26 / 0.25, mean 0.043 / 0.045). At
    632x440 px with the default EncodeTileSpec() (32x32, overlap 8, 6 tiles): max 0.19 / mean
    0.023; on uniform noise max 0.065 / mean 0.009. The bounds sit above the measured error."""
    video = smooth_video(7, 128, 192, seed=2)
    full = encoder.encode(video)
    tiled = encode_tiled(encoder, video, EncodeTileSpec(12, 12, 3))
    assert tiled.shape == full.shape == (1, 12, 2, 16, 24)
    diff = (tiled - full).abs()
    max_err, mean_err = diff.max().item(), diff.mean().item()
    assert max_err <= 0.45 and mean_err <= 0.06, f"tiled vs untiled: max {max_err:.3g}, mean {mean_err:.3g}"


def test_one_tile_over_the_whole_frame_is_the_untiled_encode(encoder):
    video = smooth_video(7, 32, 48, seed=3)
    assert torch.equal(encode_tiled(encoder, video, EncodeTileSpec()), encoder.encode(video))


def test_tiles_from_several_ranks_assemble_to_the_same_latent(encoder):
    video = smooth_video(7, 48, 64, seed=4)
    spec = EncodeTileSpec(4, 4, 1)
    tiles = plan_encode_tiles(video.shape, spec, encoder.config)
    encoded = [(tile, encode_tile(encoder, video, tile)) for tile in tiles]
    reference = encode_tiled(encoder, video, spec)
    shuffled = encoded[:]
    random.Random(0).shuffle(shuffled)
    assert torch.equal(assemble_tiles(tiles, shuffled), reference)
    for world in (2, 3):
        assert torch.equal(assemble_tiles(tiles, [p for rank in range(world) for p in encoded[rank::world]]), reference)


def test_auto_spec_picks_the_largest_tile_that_fits():
    config = VAEEncoderConfig()
    need_32 = estimate_encode_tile_peak_bytes(config, 32, 32, 163, torch.bfloat16)
    spec = EncodeTileSpec.auto(int(need_32 / 0.8) + 1, config, torch.bfloat16)
    assert (spec.tile_height, spec.overlap) == (32, 8)
    with pytest.raises(ValueError, match="not enough to encode even an 8x8 latent tile of 163 frames"):
        EncodeTileSpec.auto(2**20, config, torch.bfloat16)


@pytest.mark.parametrize("kwargs,message", [({"tile_height": 0}, "tile size"), ({"overlap": 20}, "half the tile side")])
def test_tile_spec_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncodeTileSpec(**kwargs)


def test_planner_counts_the_encoder_and_the_auto_estimate_follows_it():
    """The planner's fake-tensor count of one tile of the real encoder (bf16, all 31 frames) and
    the calibrated estimate EncodeTileSpec.auto uses agree within 10 % (the video itself, which the
    count includes and the estimate leaves out, subtracted)."""
    from mochi_xdit.mochi.planner.simulate import count_tiled_encode

    count = count_tiled_encode(848, 480, 31)
    video = 3 * 31 * 480 * 848 * 2
    estimate = estimate_encode_tile_peak_bytes(VAEEncoderConfig(), 32, 32, 31, torch.bfloat16)
    with torch.device("meta"):
        parameters = sum(t.numel() for t in MochiVAEEncoder(VAEEncoderConfig()).state_dict().values())
    assert count.tiles == 15 and count.weight_bytes == 2 * parameters  # bf16
    assert abs(estimate / (count.activation_peak_bytes - video) - 1) <= 0.10
