"""MochiTiledVAEEncode: encodes video frames (IMAGE) to a Mochi LATENT on the rank pool."""

import torch

from . import checks
from ..mochi.constants import SIZE_MULTIPLE, TEMPORAL_COMPRESSION
from ..mochi.vae_encoder import nearest_frame_counts, nearest_multiples
from ..workers.option_table import Door, node_inputs, widget_problem
from .decode import PIXELS_PER_LATENT, decode_problem
from .inputs import POOL_INPUT
from .runs import run_encode

RGB = 3


def encode_tiling_problem(tiling, tile_size, tile_overlap) -> str | None:
    """Checks of the tiling widgets (the table's limits, then the decode node's tile rules); None
    values (linked inputs) are checked at run time."""
    problem = widget_problem(Door.ENCODE, dict(tiling=tiling, tile_size=tile_size, tile_overlap=tile_overlap))
    if problem:
        return problem
    return decode_problem(tiling, tile_size, tile_overlap, None)


def image_problem(pixels) -> str | None:
    """What is wrong with an IMAGE [F, H, W, C] as Mochi video, or None: no frames, not RGB, a
    frame count other than 6k + 1, a size that is not a multiple of 16 (each with the fix)."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        return f"pixels must be an IMAGE [frames, height, width, 3]; got {shape}"
    frames, height, width, channels = pixels.shape
    if frames == 0 or height == 0 or width == 0:
        return (f"pixels holds an empty video ({frames} frames of {width}x{height}); connect frames, e.g. "
                "LoadVideo -> GetVideoComponents")
    if channels != RGB:
        fix = ("drop the alpha channel with SplitImageWithAlpha (its image output)" if channels == 4
               else "connect RGB frames")
        return f"pixels has {channels} channels per pixel; the Mochi VAE encodes RGB (3): {fix}"
    if (frames - 1) % TEMPORAL_COMPRESSION:
        return (f"pixels has {frames} frames; Mochi encodes {TEMPORAL_COMPRESSION}k + 1 frames: use "
                f"{nearest_frame_counts(frames, TEMPORAL_COMPRESSION)} (e.g. ImageFromBatch with that length)")
    for name, size in (("width", width), ("height", height)):
        if size % SIZE_MULTIPLE:
            return (f"pixels {name} {size} is not a multiple of {SIZE_MULTIPLE}; resize or crop to "
                    f"{nearest_multiples(size, SIZE_MULTIPLE)} (e.g. ImageScale)")
    return None


def encode_tile_spec(tiling: str, tile_size: int, tile_overlap: int, video_shape: tuple[int, ...]):
    """The pool's encode plan: None = "auto" (rank 0 sizes tiles to its free memory); "off" = one
    tile covering the frame; "manual" = the widget values in latent cells (`EncodeTileSpec`)."""
    from ..mochi.vae_encoder_tiling import EncodeTileSpec

    if tiling == "auto":
        return None
    H, W = video_shape[-2:]
    if tiling == "off":
        return EncodeTileSpec(tile_height=H // PIXELS_PER_LATENT, tile_width=W // PIXELS_PER_LATENT, overlap=0)
    tile = tile_size // PIXELS_PER_LATENT
    return EncodeTileSpec(tile_height=tile, tile_width=tile, overlap=tile_overlap // PIXELS_PER_LATENT)


class MochiTiledVAEEncode:
    DESCRIPTION = (
        "Encodes video frames to a Mochi latent with the pool's VAE encoder (the encoder half of "
        "mochi_vae.safetensors), in spatial tiles spread over the ranks. Replaces VAEEncode; feed the "
        "LATENT to MochiXDiTSampler with denoise < 1 for video-to-video."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Mochi video latent [1, 12, (F-1)/6+1, H/8, W/8] in VAE space, as core VAEEncode gives.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pool": POOL_INPUT,
                "pixels": ("IMAGE", {
                    "tooltip": "Video frames [F, H, W, 3] (GetVideoComponents' images): F = 6k + 1 frames, width "
                               "and height multiples of 16."}),
                **node_inputs(Door.ENCODE)["required"],
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tiling, tile_size, tile_overlap):
        return checks.refuse(encode_tiling_problem(tiling, tile_size, tile_overlap))

    def encode(self, pool, pixels, tiling, tile_size, tile_overlap):
        from ..mochi.vae_encoder import images_to_video

        problem = encode_tiling_problem(tiling, tile_size, tile_overlap) or image_problem(pixels)
        if problem:
            raise ValueError(f"MochiTiledVAEEncode: {problem}")
        video = images_to_video(pixels.detach().to("cpu", torch.float32))  # [1, 3, F, H, W] in [-1, 1]
        latent = run_encode(pool, video, encode_tile_spec(tiling, tile_size, tile_overlap, tuple(video.shape)))
        return ({"samples": latent.to("cpu", torch.float32)},)
