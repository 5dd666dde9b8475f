"""Tiled VAE decoding: temporal chunks that carry causal context, spatial tiles with a blend.

Time is exact. The decoder is causal with GroupNorm per frame, so decoding a tile in chunks of
`frame_chunk` latent frames, each chunk handed the frames its causal convs need from the chunk
before (`MochiVAEDecoder.decode_chunk`), gives the same 6T - 5 frames as one pass.

Space is approximate. GroupNorm statistics are taken over a whole frame, and convs replicate
the edge pixels of whatever they are given, so a tile sees slightly different numbers than the
full frame. Tiles therefore overlap, and every output pixel is a weighted mean of the tiles that
cover it: weights ramp linearly across the middle of each overlap (a tile's own cut edge gets no
weight) and are normalised by their sum, so any grid (odd sizes, a last tile that overlaps more)
blends to exactly 8H x 8W pixels.

Everything is planned up front by absolute latent positions: `plan_tiles` is a pure function of
the latent shape and the `TileSpec`, each `Tile` decodes on its own (`decode_tile`) from the full
latent, and `assemble_tiles` adds the results in plan order whatever order they arrive in. So
tiles can be decoded on different ranks and assembled into the same video bit for bit.

Peak memory depends on the tile size and the frame chunk, not on the video size (apart from the
output video itself and the latent).
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .vae import SPATIAL_EXPANSION, MochiVAEDecoder, VAEDecoderConfig

OVERLAP_FRACTION = 4  # TileSpec.auto: overlap = tile side / 4
EDGE_SKIP = 4  # blend: across an overlap of O px, a tile's outermost O / 4 px get no weight
TILE_CANDIDATES = (128, 96, 80, 64, 48, 40, 32, 24, 16, 12, 8)  # latent px, largest first
CHUNK_CANDIDATES = (4, 3, 2, 1)  # latent frames, largest first
MEMORY_HEADROOM = 0.8  # share of the available bytes TileSpec.auto plans to use
# The analytic count below, times this, was 2.5 % below to 11 % above the fake-tensor count of
# the real decoder in bf16 at 848x480x163 (mochi.planner; tiles 16..64, chunks 1..4).
ESTIMATE_CALIBRATION = 1.16
DEFAULT_LATENT_SHAPE = (1, 12, 28, 60, 106)  # 848x480, 163 frames


def check_tile_shape(tile_height: int, tile_width: int, overlap: int) -> None:
    """Raise ValueError unless the tile is at least 1 latent px and the overlap at most half its
    side (decode and encode tiles alike)."""
    if tile_height < 1 or tile_width < 1:
        raise ValueError(f"tile size must be >= 1 latent px, got {tile_height}x{tile_width}")
    if overlap < 0 or 2 * overlap > min(tile_height, tile_width):
        raise ValueError(
            f"overlap={overlap} must be between 0 and half the tile side "
            f"({tile_height}x{tile_width}); e.g. overlap={min(tile_height, tile_width) // 4}"
        )


@dataclass(frozen=True)
class TileSpec:
    """How to cut a decode. All sizes in latent units (1 latent px = 8 output px, 1 latent frame
    = 6 output frames).

    Args:
        tile_height, tile_width: tile size in latent px (a tile is clipped to the latent grid).
        overlap: latent px (at least) shared by neighbouring tiles, where they are blended; at
            most half the tile side. Larger overlaps cost more compute and agree better with an
            untiled decode.
        frame_chunk: latent frames decoded per step; peak memory grows about linearly with it.
    """

    tile_height: int = 32
    tile_width: int = 32
    overlap: int = 8
    frame_chunk: int = 2

    def __post_init__(self):
        check_tile_shape(self.tile_height, self.tile_width, self.overlap)
        if self.frame_chunk < 1:
            raise ValueError(f"frame_chunk must be >= 1 latent frame, got {self.frame_chunk}")

    @classmethod
    def auto(
        cls,
        available_bytes: int,
        config: VAEDecoderConfig = VAEDecoderConfig(),
        dtype: torch.dtype = torch.bfloat16,
        latent_shape: tuple[int, ...] = DEFAULT_LATENT_SHAPE,
    ) -> "TileSpec":
        """The largest square tile (then the largest frame chunk) whose estimated decode peak fits
        in 80 % of `available_bytes`, with overlap = tile side / 4.

        Args:
            available_bytes: memory free for the decode (weights and the assembled video excluded).
            config: decoder size (the real decoder by default).
            dtype: compute dtype of the decode.
            latent_shape: [B, C, T, H, W] of the latents to decode (tiles are clipped to H x W; the
                per-tile output buffer grows with T); default 848x480, 163 frames.

        Raises ValueError when even the smallest tile does not fit.
        """
        T, H, W = latent_shape[-3:]
        budget = MEMORY_HEADROOM * available_bytes
        for tile in TILE_CANDIDATES:
            for chunk in CHUNK_CANDIDATES:
                need = estimate_tile_peak_bytes(config, min(tile, H), min(tile, W), min(chunk, T), T, dtype)
                if need <= budget:
                    return cls(tile, tile, tile // OVERLAP_FRACTION, chunk)
        smallest = TILE_CANDIDATES[-1]
        need = estimate_tile_peak_bytes(config, min(smallest, H), min(smallest, W), 1, T, dtype)
        raise ValueError(
            f"{available_bytes / 2**30:.2f} GiB is not enough to decode even an {smallest}x{smallest} "
            f"latent tile one frame at a time (about {need / 2**30:.2f} GiB); free memory or give a "
            "TileSpec by hand"
        )


def estimate_tile_peak_bytes(
    config: VAEDecoderConfig,
    tile_height: int,
    tile_width: int,
    frame_chunk: int,
    latent_frames: int,
    dtype: torch.dtype,
) -> int:
    """Estimated peak bytes of `decode_tile` for one tile (activations, carried context and the
    tile's output buffer; not the weights or the assembled video).

    Counts, at each level of the decoder, the tensors alive in a ResBlock's conv (its input, the
    norm output, the padded copy with 2 extra frames and 1 extra pixel per side, the conv output)
    and in an upsampling projection (input, its channel-last copy, output, depth-to-space copy),
    plus the two frames every causal conv carries to the next chunk.
    """
    item = dtype.itemsize
    area = tile_height * tile_width
    frames, side = frame_chunk, 1  # frames per chunk and pixels per latent px side at this level
    context = 0
    peak = 0
    n = config.num_up_blocks
    for level in range(n + 1):  # 0 = latent level (blocks.0 and blocks.1's ResBlocks)
        width = config.channels[n - level]
        res_blocks = config.num_res_blocks[n - level + 1] if level == 0 else 0
        res_blocks += config.num_res_blocks[n - level]
        pixels = area * side * side
        padded = width * (frames + 2) * (tile_height * side + 2) * (tile_width * side + 2)
        if res_blocks:
            peak = max(peak, 3 * width * frames * pixels + padded)
        context += res_blocks * 2 * 2 * width * pixels  # 2 convs per block, 2 frames each
        if level < n:
            expansion = config.temporal_expansions[n - level - 1]
            projected = config.channels[n - level - 1] * expansion * SPATIAL_EXPANSION**2 * frames * pixels
            peak = max(peak, 2 * width * frames * pixels + 2 * projected)
            frames, side = frames * expansion, side * SPATIAL_EXPANSION
    final = config.channels[0] * frames * area * side * side
    peak = max(peak, 2 * final + config.out_channels * frames * area * side * side)
    output = config.out_channels * config.video_frames(latent_frames) * area * side * side  # tile buffer
    return math.ceil(ESTIMATE_CALIBRATION * item * (peak + context + output))


@dataclass(frozen=True)
class Tile:
    """One spatial tile of a plan, by absolute latent positions (half-open ranges).

    Args:
        index: position in the plan (row-major); tiles are assembled in this order.
        rows, cols: [start, end) latent rows / columns this tile decodes.
        row_spans, col_spans: every tile row's / column's [start, end), so blend weights can be
            computed from the tile alone.
        frame_chunk: latent frames per temporal chunk.
    """

    index: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    row_spans: tuple[tuple[int, int], ...]
    col_spans: tuple[tuple[int, int], ...]
    frame_chunk: int

    @property
    def row(self) -> int:
        return self.index // len(self.col_spans)

    @property
    def col(self) -> int:
        return self.index % len(self.col_spans)


def axis_spans(length: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Cover [0, length) with equal tiles of min(tile, length) that overlap by at least `overlap`.

    n = ceil((length - overlap) / (tile - overlap)) tiles; starts floor(i * (length - tile) / (n - 1))
    put the first tile at 0 and the last at the end, spreading any slack over all overlaps.
    """
    if length <= tile:
        return ((0, length),)
    n = -(-(length - overlap) // (tile - overlap))
    return tuple(((i * (length - tile)) // (n - 1), (i * (length - tile)) // (n - 1) + tile) for i in range(n))


def plan_tiles(latent_shape: tuple[int, ...], spec: TileSpec) -> list[Tile]:
    """Deterministic tile plan for a latent video [B, C, T, H, W] (or any shape ending in H, W).

    Returns:
        Tiles in row-major order; together they cover every latent pixel, neighbours overlap by
        at least `spec.overlap` latent px (clipped to the grid).
    """
    H, W = int(latent_shape[-2]), int(latent_shape[-1])
    row_spans = axis_spans(H, spec.tile_height, spec.overlap)
    col_spans = axis_spans(W, spec.tile_width, spec.overlap)
    return [
        Tile(r * len(col_spans) + c, rows, cols, row_spans, col_spans, spec.frame_chunk)
        for r, rows in enumerate(row_spans)
        for c, cols in enumerate(col_spans)
    ]


def decode_tile(decoder: MochiVAEDecoder, latent: torch.Tensor, tile: Tile) -> torch.Tensor:
    """Decode one tile from the full latent, in temporal chunks that carry causal context.

    Args:
        decoder: the VAE decoder.
        latent: [B, 12, T, H, W] full VAE-space latent (the tile slices it).
        tile: from `plan_tiles(latent.shape, spec)`.

    Returns:
        [B, 3, 6T - 5, 8h, 8w] decoded pixels of the tile (h, w its latent size), equal to an
        untiled decode of the tile's latent (fp32: within 1e-5).
    """
    decoder.check_latent(latent)
    B, _, T, _, _ = latent.shape
    (y0, y1), (x0, x1) = tile.rows, tile.cols
    scale = decoder.config.spatial_compression
    patch = latent[:, :, :, y0:y1, x0:x1]  # [B, 12, T, h, w]
    config = decoder.config
    out = latent.new_empty(B, config.out_channels, config.video_frames(T), (y1 - y0) * scale, (x1 - x0) * scale)
    carried = None
    written = 0
    for t0 in range(0, T, tile.frame_chunk):
        frames, carried = decoder.decode_chunk(patch[:, :, t0 : t0 + tile.frame_chunk], carried)
        out[:, :, written : written + frames.shape[2]] = frames  # first chunk 6k-5 frames, then 6k
        written += frames.shape[2]
        del frames  # not alive during the next chunk
    return out


def ramp_weights(
    spans: tuple[tuple[int, int], ...], scale: int, dtype: torch.dtype = torch.float32, device=None
) -> list[torch.Tensor]:
    """Normalised 1-D blend weights of every tile along one axis, in output pixels.

    Inside a tile the weight is 1. Across an overlap of O px with a neighbour it is 0 on the
    tile's outermost O/4 px (its own cut edge, where replicate padding disturbs it most), then
    ramps linearly to 1 over the middle half of the overlap; the neighbour's ramp is the mirror
    image, so the two sum to 1. Weights are then divided by their sum over all tiles at each
    pixel, which keeps any layout (uneven overlaps, three tiles over one pixel) a partition of
    unity. Computed in Python floats from the plan alone (no tensor values are read, so this
    also runs under fake-tensor modes).
    """

    def ramp(distance: int, overlap: int) -> float:
        if overlap == 0:
            return 1.0
        skip = overlap // EDGE_SKIP
        return min(1.0, max(0.0, (distance - skip + 0.5) / (overlap - 2 * skip)))

    raw = []
    for i, (start, end) in enumerate(spans):
        size = (end - start) * scale
        overlap_lo = (spans[i - 1][1] - start) * scale if i > 0 else 0
        overlap_hi = (end - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
        raw.append([ramp(p, overlap_lo) * ramp(size - 1 - p, overlap_hi) for p in range(size)])
    total = [0.0] * (spans[-1][1] * scale)
    for (start, _), weight in zip(spans, raw):
        for p, w in enumerate(weight):
            total[start * scale + p] += w
    if min(total) <= 0.0:
        raise ValueError(f"tiles {spans} overlap so much that some pixel has no blend weight; use a smaller overlap")
    return [
        torch.tensor([w / total[start * scale + p] for p, w in enumerate(weight)], dtype=dtype, device=device)
        for (start, _), weight in zip(spans, raw)
    ]


class TileAssembler:
    """Blends decoded tiles into one video, adding them in plan order.

    Tiles may arrive in any order (e.g. gathered from several ranks); early arrivals wait until
    every tile before them is added, so the floating-point sum, and thus the video, is the same
    for any arrival order and any number of ranks.

    Args:
        tiles: the plan (`plan_tiles`).
        device: where the video is assembled (default: the device of the first tile).
    """

    def __init__(self, tiles: list[Tile], device: torch.device | None = None):
        if not tiles:
            raise ValueError("an empty tile plan; plan_tiles(latent_shape, spec) never makes one")
        self.tiles = tiles
        self.device = device
        self.video: torch.Tensor | None = None
        self.next_index = 0
        self.waiting: dict[int, torch.Tensor] = {}
        self.row_weights: list[torch.Tensor] = []
        self.col_weights: list[torch.Tensor] = []
        self.scale = 0

    def add(self, tile: Tile, pixels: torch.Tensor) -> None:
        """Add one decoded tile ([B, 3, F, 8h, 8w] from `decode_tile`)."""
        if not 0 <= tile.index < len(self.tiles) or tile != self.tiles[tile.index]:
            raise ValueError(f"tile {tile.index} is not from this plan")
        if tile.index < self.next_index or tile.index in self.waiting:
            raise ValueError(f"tile {tile.index} was added twice")
        self.waiting[tile.index] = pixels
        while self.next_index in self.waiting:
            self._blend(self.tiles[self.next_index], self.waiting.pop(self.next_index))
            self.next_index += 1

    def _blend(self, tile: Tile, pixels: torch.Tensor) -> None:
        B, C, F, h, w = pixels.shape
        (y0, y1), (x0, x1) = tile.rows, tile.cols
        if self.video is None:
            self.scale = h // (y1 - y0)
            device = self.device if self.device is not None else pixels.device
            height, width = tile.row_spans[-1][1] * self.scale, tile.col_spans[-1][1] * self.scale
            self.video = torch.zeros(B, C, F, height, width, dtype=torch.float32, device=device)
            self.row_weights = ramp_weights(tile.row_spans, self.scale, device=device)
            self.col_weights = ramp_weights(tile.col_spans, self.scale, device=device)
        s = self.scale
        if (h, w) != ((y1 - y0) * s, (x1 - x0) * s) or (B, C, F) != tuple(self.video.shape[:3]):
            raise ValueError(
                f"tile {tile.index} has shape {tuple(pixels.shape)}; expected "
                f"{tuple(self.video.shape[:3]) + ((y1 - y0) * s, (x1 - x0) * s)}"
            )
        weight = self.row_weights[tile.row][:, None] * self.col_weights[tile.col][None, :]  # [h, w]
        region = self.video[:, :, :, y0 * s : y1 * s, x0 * s : x1 * s]
        region.add_(pixels.to(device=region.device, dtype=torch.float32) * weight)

    def result(self) -> torch.Tensor:
        """The assembled video [B, 3, F, 8H, 8W] (fp32); raises if a tile is missing."""
        if self.next_index != len(self.tiles):
            missing = [t.index for t in self.tiles[self.next_index :] if t.index not in self.waiting]
            raise ValueError(f"cannot assemble: tiles {missing} were never added")
        return self.video


def assemble_tiles(
    tiles: list[Tile], decoded: Iterable[tuple[Tile, torch.Tensor]], device: torch.device | None = None
) -> torch.Tensor:
    """Blend decoded tiles into one video.

    Args:
        tiles: the plan the tiles were decoded from.
        decoded: (tile, pixels) pairs in any order, e.g. a generator, so only one decoded tile
            needs to be alive at a time when they come in plan order.
        device: where to assemble (default: the first tile's device).

    Returns:
        [B, 3, 6T - 5, 8H, 8W] fp32 video; identical for any arrival order.
    """
    assembler = TileAssembler(tiles, device)
    for tile, pixels in decoded:
        assembler.add(tile, pixels)
    return assembler.result()


def decode_tiled(decoder: MochiVAEDecoder, latent: torch.Tensor, spec: TileSpec) -> torch.Tensor:
    """Decode a latent video tile by tile on this process (what `MochiVAEDecoder.decode(latent,
    tiles=spec)` runs).

    Returns:
        [B, 3, 6T - 5, 8H, 8W] fp32 video.
    """
    tiles = plan_tiles(latent.shape, spec)
    return assemble_tiles(tiles, ((tile, decode_tile(decoder, latent, tile)) for tile in tiles))
