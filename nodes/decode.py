"""MochiTiledVAEDecode: decodes a Mochi LATENT to video frames on the rank pool."""

from . import checks
from .comfy_types import frames_to_image, latent_samples
from .pool_bridge import POOL_TYPE, run_decode

TILING_MODES = ("auto", "manual", "off")
MIN_TILE, MAX_TILE, TILE_STEP = 64, 4096, 16
MAX_OVERLAP = 1024
MAX_FRAME_CHUNK = 1024


def decode_problem(tiling, tile_size, tile_overlap, frame_chunk) -> str | None:
    """Checks of the tiling widgets; None values (linked inputs) are checked at run time."""
    for value, check in (
        (tiling, lambda: checks.choice_problem("tiling", tiling, TILING_MODES)),
        (tile_size, lambda: checks.int_problem("tile_size", tile_size, MIN_TILE, MAX_TILE)),
        (tile_overlap, lambda: checks.int_problem("tile_overlap", tile_overlap, 0, MAX_OVERLAP)),
        (frame_chunk, lambda: checks.int_problem("frame_chunk", frame_chunk, 1, MAX_FRAME_CHUNK)),
    ):
        problem = None if value is None else check()
        if problem:
            return problem
    if tiling == "manual" and None not in (tile_size, tile_overlap):
        if tile_size % TILE_STEP or tile_overlap % TILE_STEP:
            return (f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of {TILE_STEP} "
                    "pixels (2 latent cells)")
        if 2 * tile_overlap >= tile_size:
            return (f"tile_overlap={tile_overlap} must be less than half of tile_size={tile_size}; lower the "
                    "overlap or raise the tile size")
    return None


def tile_spec(tiling: str, tile_size: int, tile_overlap: int, frame_chunk: int):
    """The decode tiling for the pool: None = whole latent at once, "auto" = the VAE's own choice,
    else `mochi.vae_tiling.TileSpec` from the manual numbers."""
    if tiling == "off":
        return None
    from ..mochi.vae_tiling import TileSpec

    if tiling == "auto":
        return TileSpec.auto()
    return TileSpec(tile_pixels=tile_size, overlap_pixels=tile_overlap, frame_chunk=frame_chunk)


class MochiTiledVAEDecode:
    DESCRIPTION = (
        "Decodes a Mochi video latent to frames with the pool's VAE decoder, in tiles spread over the "
        "ranks (bounded memory, exact causal chunking in time). Replaces VAEDecode; connect the IMAGE "
        "to CreateVideo + SaveVideo."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Video frames [6T-5, 8H, 8W, 3] in [0, 1] (frames are the batch dimension).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pool": (POOL_TYPE, {"tooltip": "The rank pool from MochiXDiTLoader (its VAE decodes)."}),
                "samples": ("LATENT", {
                    "tooltip": "A Mochi video latent in VAE space: MochiXDiTSampler's output or any Mochi LATENT."}),
                "tiling": (list(TILING_MODES), {
                    "default": "auto",
                    "tooltip": "auto: tile sizes chosen to bound memory. manual: use the three values below. "
                               "off: decode everything at once (most memory)."}),
                "tile_size": ("INT", {
                    "default": 256, "min": MIN_TILE, "max": MAX_TILE, "step": TILE_STEP,
                    "tooltip": "manual: tile width/height in output pixels. Smaller tiles use less memory "
                               "and take a little longer."}),
                "tile_overlap": ("INT", {
                    "default": 64, "min": 0, "max": MAX_OVERLAP, "step": TILE_STEP,
                    "tooltip": "manual: pixels shared by neighbouring tiles and blended; more hides seams, "
                               "costs time. Must be under half the tile size."}),
                "frame_chunk": ("INT", {
                    "default": 4, "min": 1, "max": MAX_FRAME_CHUNK, "step": 1,
                    "tooltip": "manual: latent frames decoded per chunk (each makes 6 video frames); the causal "
                               "decoder carries state across chunks, so the result is exact. Lower uses less "
                               "memory."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tiling, tile_size, tile_overlap, frame_chunk):
        return decode_problem(tiling, tile_size, tile_overlap, frame_chunk) or True

    def decode(self, pool, samples, tiling, tile_size, tile_overlap, frame_chunk):
        problem = decode_problem(tiling, tile_size, tile_overlap, frame_chunk) or checks.latent_problem(samples)
        if problem:
            raise ValueError(problem)
        video = run_decode(pool, latent_samples(samples), tile_spec(tiling, tile_size, tile_overlap, frame_chunk))
        return (frames_to_image(video),)
