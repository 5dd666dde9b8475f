"""Tiled VAE encoding: spatial tiles with a blend, the whole video in time.

Time is not split. The encoder's attention joins every frame of a pixel (causal: frame t sees
frames 0..t), so a later temporal chunk would need the keys and values of all earlier frames at
each of the 16 attention layers, about 90 values per video value (2 x (3 x 128 / 4 + 4 x 256 / 32
+ 9 x 384 / 384) per pixel and frame against 3); each tile therefore encodes all its frames at
once and memory is bounded by the tile's area times the frame count.

Space is approximate, as in the decoder: GroupNorm statistics are taken over a whole frame and
convs replicate a tile's edge pixels, so a tile sees slightly different numbers than the full
frame. Tiles overlap and every latent pixel is a weighted mean of the tiles that cover it, with
the decoder's blend (`vae_tiling.ramp_weights`, `TileAssembler`) at latent resolution. The error
against the untiled encoder is measured in tests/test_vae_encoder_tiling.py; the README states it.

The plan is a pure function of the video shape and the `EncodeTileSpec` (`plan_encode_tiles`),
each tile encodes on its own from the full video (`encode_tile`), and `vae_tiling.assemble_tiles`
adds the tiles in plan order, so tiles encoded on several ranks give the same latent bit for bit.
"""

import math
from dataclasses import dataclass

import torch

from .vae_encoder import MochiVAEEncoder, VAEEncoderConfig
from .vae_tiling import OVERLAP_FRACTION, TILE_CANDIDATES, Tile, assemble_tiles, axis_spans, check_tile_shape

MEMORY_HEADROOM = 0.8  # share of the available bytes EncodeTileSpec.auto plans to use
# The analytic count below, times this, matched the fake-tensor count of the real encoder in bf16
# (mochi.planner count_tiled_encode, the video itself subtracted) within 4 %: 848x480 with 163 and
# 31 frames, tiles 16 and 32 latent px (the count was 1.71 to 1.74 x the uncalibrated sum).
ESTIMATE_CALIBRATION = 1.8
DEFAULT_VIDEO_SHAPE = (1, 3, 163, 480, 848)


@dataclass(frozen=True)
class EncodeTileSpec:
    """How to cut an encode. Sizes in latent px (1 latent px = 8 video px).

    Args:
        tile_height, tile_width: tile size in latent px (clipped to the latent grid); 32 = 256
            video px.
        overlap: latent px (at least) shared by neighbouring tiles, where they are blended; at
            most half the tile side. Larger overlaps cost compute and agree better with an
            untiled encode.
    """

    tile_height: int = 32
    tile_width: int = 32
    overlap: int = 8

    def __post_init__(self):
        check_tile_shape(self.tile_height, self.tile_width, self.overlap)

    @classmethod
    def auto(
        cls,
        available_bytes: int,
        config: VAEEncoderConfig = VAEEncoderConfig(),
        dtype: torch.dtype = torch.bfloat16,
        video_shape: tuple[int, ...] = DEFAULT_VIDEO_SHAPE,
    ) -> "EncodeTileSpec":
        """The largest square tile whose estimated encode peak fits in 80 % of `available_bytes`,
        overlap = tile side / 4.

        Args:
            available_bytes: memory free for the encode (weights and the video excluded).
            config: encoder size (the real encoder by default).
            dtype: compute dtype.
            video_shape: [B, 3, F, H, W] of the video (tiles are clipped to it); default 848x480x163.

        Raises ValueError when even the smallest tile does not fit.
        """
        B, _, F, H, W = video_shape
        s = config.spatial_compression
        budget = MEMORY_HEADROOM * available_bytes
        for tile in TILE_CANDIDATES:
            if estimate_encode_tile_peak_bytes(config, min(tile, H // s), min(tile, W // s), F, dtype, B) <= budget:
                return cls(tile, tile, tile // OVERLAP_FRACTION)
        smallest = TILE_CANDIDATES[-1]
        need = estimate_encode_tile_peak_bytes(config, min(smallest, H // s), min(smallest, W // s), F, dtype, B)
        raise ValueError(
            f"{available_bytes / 2**30:.2f} GiB is not enough to encode even an {smallest}x{smallest} latent tile "
            f"of {F} frames (about {need / 2**30:.2f} GiB); free memory, encode fewer frames at a time, or give "
            "an EncodeTileSpec by hand"
        )


def estimate_encode_tile_peak_bytes(
    config: VAEEncoderConfig, tile_height: int, tile_width: int, frames: int, dtype: torch.dtype, batch: int = 1
) -> int:
    """Estimated peak bytes of `encode_tile` for one tile (activations and the tile's input slice;
    not the weights or the whole video).

    Counts, at each level, the tensors alive in a ResBlock's conv (input, norm output, the padded
    copy with 2 extra frames and 1 extra pixel per side, the conv output) and, where the level has
    attention, in the attention block (input, norm output, the pixel-major token copy, q/k/v,
    the attention output and its projection); at the input, the fp32 Fourier features.
    """
    item = dtype.itemsize
    height, width = tile_height * config.spatial_compression, tile_width * config.spatial_compression
    fourier = 4 * (config.in_channels + 5 * config.in_channels) * frames * height * width  # fp32 in and out
    peak = fourier + item * config.channels[0] * frames * height * width
    reductions = (1, *config.temporal_reductions)
    for level, channels in enumerate(config.channels):
        frames = (frames + reductions[level] - 1) // reductions[level]
        if level:
            height, width = height // 2, width // 2
        activation = channels * frames * height * width
        padded = channels * (frames + 2) * (height + 2) * (width + 2)
        peak = max(peak, item * (3 * activation + padded))
        if config.has_attention[level] or (level == len(config.channels) - 1 and config.has_attention[-1]):
            peak = max(peak, item * 8 * activation)
    return math.ceil(ESTIMATE_CALIBRATION * batch * peak)


def plan_encode_tiles(video_shape: tuple[int, ...], spec: EncodeTileSpec, config: VAEEncoderConfig) -> list[Tile]:
    """Deterministic tile plan for a video [B, 3, F, H, W] (H, W multiples of 8), by latent
    positions; each tile covers all frames (its `frame_chunk` is the whole latent length).

    Returns:
        Tiles in row-major order covering every latent pixel; neighbours overlap by at least
        `spec.overlap` latent px (clipped to the grid).
    """
    F, H, W = (int(n) for n in video_shape[-3:])
    s = config.spatial_compression
    row_spans = axis_spans(H // s, spec.tile_height, spec.overlap)
    col_spans = axis_spans(W // s, spec.tile_width, spec.overlap)
    frames = config.latent_frames(F)
    return [
        Tile(r * len(col_spans) + c, rows, cols, row_spans, col_spans, frames)
        for r, rows in enumerate(row_spans)
        for c, cols in enumerate(col_spans)
    ]


def encode_tile(encoder: MochiVAEEncoder, video: torch.Tensor, tile: Tile) -> torch.Tensor:
    """Encode one tile of the full video.

    Args:
        encoder: the VAE encoder.
        video: [B, 3, F, H, W] in [-1, 1] (the tile slices it); its dtype is the compute dtype.
        tile: from `plan_encode_tiles(video.shape, spec, encoder.config)`.

    Returns:
        [B, 12, t, h, w] latent mean of the tile (h, w its latent size), equal to an untiled
        encode of the tile's pixels.
    """
    s = encoder.config.spatial_compression
    (y0, y1), (x0, x1) = tile.rows, tile.cols
    return encoder.encode(video[:, :, :, y0 * s : y1 * s, x0 * s : x1 * s])  # [B, 12, t, h, w]


def encode_tiled(encoder: MochiVAEEncoder, video: torch.Tensor, spec: EncodeTileSpec) -> torch.Tensor:
    """Encode a video tile by tile on this process.

    Args:
        encoder: the VAE encoder.
        video: [B, 3, F, H, W] in [-1, 1], F = 6k + 1, H and W multiples of 8.
        spec: the tiling.

    Returns:
        [B, 12, k + 1, H / 8, W / 8] fp32 VAE-space latent mean.
    """
    encoder.check_video(video)
    tiles = plan_encode_tiles(video.shape, spec, encoder.config)
    return assemble_tiles(tiles, ((tile, encode_tile(encoder, video, tile)) for tile in tiles))
