"""MochiTiledVAEDecode: decodes a Mochi LATENT to video frames on the rank pool."""

from ..mochi.constants import SPATIAL_COMPRESSION
from ..workers.option_table import Door, node_inputs, widget_problem
from . import checks
from .comfy_types import frames_to_image, latent_samples
from .handle import POOL_TYPE
from .runs import run_decode

PIXELS_PER_LATENT = SPATIAL_COMPRESSION  # tile sizes are given in output pixels, multiples of this


def decode_problem(tiling, tile_size, tile_overlap, frame_chunk) -> str | None:
    """Checks of the tiling widgets; None values (linked inputs) are checked at run time."""
    problem = widget_problem(Door.DECODE, dict(tiling=tiling, tile_size=tile_size, tile_overlap=tile_overlap,
                                               frame_chunk=frame_chunk))
    if problem:
        return problem
    if tiling == "manual" and None not in (tile_size, tile_overlap):
        if tile_size % PIXELS_PER_LATENT or tile_overlap % PIXELS_PER_LATENT:
            return (f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of "
                    f"{PIXELS_PER_LATENT} pixels (one latent cell)")
        if 2 * tile_overlap > tile_size:
            return (f"tile_overlap={tile_overlap} must be at most half of tile_size={tile_size}; lower the overlap "
                    f"(a quarter of the tile, {tile_size // 4 // PIXELS_PER_LATENT * PIXELS_PER_LATENT}, works well) "
                    "or raise the tile size")
    return None


def tile_spec(tiling: str, tile_size: int, tile_overlap: int, frame_chunk: int, latent_shape: tuple[int, ...]):
    """The pool's decode plan: None = "auto" (rank 0 sizes tiles to its free memory); "off" = one
    tile and one chunk covering the whole latent [B, 12, T, H, W]; "manual" = the widget values
    converted from pixels to latent cells (`mochi.vae_tiling.TileSpec`)."""
    from ..mochi.vae_tiling import TileSpec

    if tiling == "auto":
        return None
    T, H, W = latent_shape[-3:]
    if tiling == "off":
        return TileSpec(tile_height=H, tile_width=W, overlap=0, frame_chunk=T)
    tile = tile_size // PIXELS_PER_LATENT
    return TileSpec(tile_height=tile, tile_width=tile, overlap=tile_overlap // PIXELS_PER_LATENT,
                    frame_chunk=frame_chunk)


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
        widgets = node_inputs(Door.DECODE)
        return {
            "required": {
                "pool": (POOL_TYPE, {"tooltip": "The rank pool from MochiXDiTLoader (its VAE decodes)."}),
                "samples": ("LATENT", {
                    "tooltip": "A Mochi video latent in VAE space: MochiXDiTSampler's output or any Mochi LATENT."}),
                **widgets["required"],
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tiling, tile_size, tile_overlap, frame_chunk):
        return checks.refuse(decode_problem(tiling, tile_size, tile_overlap, frame_chunk))

    def decode(self, pool, samples, tiling, tile_size, tile_overlap, frame_chunk):
        problem = decode_problem(tiling, tile_size, tile_overlap, frame_chunk) or checks.latent_problem(samples)
        if problem:
            raise ValueError(problem)
        latent = latent_samples(samples)
        video = run_decode(pool, latent, tile_spec(tiling, tile_size, tile_overlap, frame_chunk, tuple(latent.shape)))
        return (frames_to_image(video),)
