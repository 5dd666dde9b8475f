"""Conversions between ComfyUI's data types and ours (no ComfyUI import needed).

- CONDITIONING (CLIPTextEncode with CLIPLoader type "mochi"):
  `[[cond [1, L, 4096] float, {"pooled_output": None, "attention_mask": [1, L] int64}]]`
  -> `mochi.text.TextCondition`.
- LATENT: `{"samples": [B, 12, T, H/8, W/8]}` in VAE space (ComfyUI latent_formats.Mochi).
- IMAGE: `[frames, H, W, 3]` float32 in [0, 1]; our decoder gives [B, 3, F, H, W] in [-1, 1].
- progress preview: ("JPEG", PIL.Image, max_size), as ComfyUI's latent_preview makes it.
"""

import torch

from ..mochi.constants import LATENT_CHANNELS, T5_DIM
from ..mochi.text import TextCondition

# Conditioning options that change what a sampler does with the prompt (areas, masks, timestep
# ranges, control nets). This pack's sampler uses the whole prompt for the whole run.
UNSUPPORTED_CONDITIONING_KEYS = ("area", "mask", "control", "gligen", "hooks")

# ComfyUI comfy/latent_formats.py Mochi: model-space latent -> approximate RGB, for previews only.
LATENT_RGB_FACTORS = (
    (-0.0069, -0.0045, 0.0018), (0.0154, -0.0692, -0.0274), (0.0333, 0.0019, 0.0206),
    (-0.1390, 0.0628, 0.1678), (-0.0725, 0.0134, -0.1898), (0.0074, -0.0270, -0.0209),
    (-0.0176, -0.0277, -0.0221), (0.5294, 0.5204, 0.3852), (-0.0326, -0.0446, -0.0143),
    (-0.0659, 0.0153, -0.0153), (0.0185, -0.0217, 0.0014), (-0.0396, -0.0495, -0.0281),
)
LATENT_RGB_BIAS = (-0.0940, -0.1418, -0.1453)
DEFAULT_PREVIEW_SIZE = 512  # ComfyUI --preview-size default


def conditioning_to_text(conditioning, which: str) -> TextCondition:
    """One CLIPTextEncode output -> TextCondition.

    Args:
        conditioning: ComfyUI CONDITIONING, a list of [tensor [1, L, 4096], dict].
        which: "positive" or "negative", for messages.
    Returns:
        TextCondition with features [1, L, 4096] float32 and mask [1, L] int64 (all ones when the
        conditioning carries no attention_mask, as ComfyUI's own Mochi model treats it).
    """
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise ValueError(f"{which}: expected CONDITIONING from CLIPTextEncode, got {type(conditioning).__name__}")
    if len(conditioning) != 1:
        raise ValueError(
            f"{which}: this CONDITIONING holds {len(conditioning)} entries (Conditioning Combine / "
            "area conditioning); Mochi xDiT takes exactly one prompt per input: use one CLIPTextEncode"
        )
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor):
        raise ValueError(f"{which}: malformed CONDITIONING entry; connect a CLIPTextEncode output")
    features, options = entry[0], entry[1] if isinstance(entry[1], dict) else {}
    used = [key for key in UNSUPPORTED_CONDITIONING_KEYS if options.get(key) is not None]
    if used or options.get("start_percent", 0.0) != 0.0 or options.get("end_percent", 1.0) != 1.0:
        used += [key for key in ("start_percent", "end_percent") if key in options]
        raise ValueError(
            f"{which}: conditioning options {', '.join(used)} are not supported by MochiXDiTSampler "
            "(whole prompt, whole run); remove the node that sets them"
        )
    if features.dim() != 3 or features.shape[-1] != T5_DIM:
        raise ValueError(
            f"{which}: text features of shape {tuple(features.shape)} are not T5-XXL ([1, L, {T5_DIM}]); "
            "load the text encoder with CLIPLoader type 'mochi' (a t5xxl file)"
        )
    if features.shape[0] != 1:
        raise ValueError(f"{which}: {features.shape[0]} prompts in one conditioning; use one prompt per input")
    mask = options.get("attention_mask")
    if mask is None:
        mask = torch.ones(features.shape[:2], dtype=torch.int64)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{which}: attention_mask must be a tensor, got {type(mask).__name__}")
    return TextCondition(features.detach().to("cpu", torch.float32).contiguous(), mask.detach().to("cpu", torch.int64))


def latent_samples(latent: dict) -> torch.Tensor:
    """The VAE-space samples [B, 12, T, H, W] as float32 on CPU."""
    return latent["samples"].detach().to("cpu", torch.float32)


def output_latent(latent_in: dict, samples: torch.Tensor) -> dict:
    """A LATENT like `latent_in` (every other key kept, noise_mask and batch_index too, as core
    KSampler returns it) holding VAE-space samples."""
    out = dict(latent_in)
    out["samples"] = samples
    return out


def frames_to_image(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, F, H, W] in [-1, 1] -> IMAGE [B*F, H, W, 3] float32 in [0, 1]
    (ComfyUI's VAE.process_output clamp((x + 1) / 2, 0, 1), then VAEDecode's batch*frames reshape)."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"expected decoded video [B, 3, F, H, W], got {tuple(video.shape)}")
    images = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0)  # [B, 3, F, H, W]
    images = images.permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
    return images.reshape(-1, *images.shape[2:]).contiguous()  # [B*F, H, W, 3]


def preview_image(model_latent: torch.Tensor, max_size: int = DEFAULT_PREVIEW_SIZE):
    """ComfyUI's Latent2RGB preview of one frame: model-space latent [B, 12, T, h, w] or
    [12, h, w] -> ("JPEG", PIL.Image, max_size)."""
    from PIL import Image

    frame = model_latent.float()
    if frame.dim() == 5:
        frame = frame[0, :, frame.shape[2] // 2]  # [12, h, w], the middle latent frame
    if frame.dim() != 3 or frame.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"preview needs a Mochi latent, got {tuple(model_latent.shape)}")
    factors = torch.tensor(LATENT_RGB_FACTORS)  # [12, 3]
    rgb = frame.permute(1, 2, 0) @ factors + torch.tensor(LATENT_RGB_BIAS)  # [h, w, 3] in ~[-1, 1]
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    return ("JPEG", Image.fromarray(pixels), max_size)
