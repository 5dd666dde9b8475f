"""Mochi's latent spaces and noise, exactly as ComfyUI handles them.

LATENT values that travel between nodes are in VAE space; the DiT samples in model space
(per-channel standardised with the 12 constants of `constants.py`, ComfyUI `latent_formats.Mochi`).
An all-zero latent (EmptyMochiLatentVideo) is "empty" and never normalised, like ComfyUI's
`CFGGuider.inner_sample`.
"""

import torch

from .constants import LATENT_CHANNELS, LATENT_MEAN, LATENT_STD


def _stats(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std shaped [1, 12, 1, 1, 1], built in float32 then cast like ComfyUI does."""
    if latent.dim() != 5 or latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"expected a Mochi latent [B, {LATENT_CHANNELS}, T, H, W], got shape {tuple(latent.shape)}"
        )
    mean = torch.tensor(LATENT_MEAN).view(1, LATENT_CHANNELS, 1, 1, 1).to(latent.device, latent.dtype)
    std = torch.tensor(LATENT_STD).view(1, LATENT_CHANNELS, 1, 1, 1).to(latent.device, latent.dtype)
    return mean, std


def to_model_space(vae_latent: torch.Tensor) -> torch.Tensor:
    """(vae - mean) / std per channel. [B, 12, T, H, W] -> same shape and dtype."""
    mean, std = _stats(vae_latent)
    return (vae_latent - mean) / std


def to_vae_space(model_latent: torch.Tensor) -> torch.Tensor:
    """model * std + mean per channel. [B, 12, T, H, W] -> same shape and dtype."""
    mean, std = _stats(model_latent)
    return model_latent * std + mean


def is_empty_latent(latent: torch.Tensor) -> bool:
    """True for an all-zero latent, which ComfyUI leaves un-normalised."""
    return torch.count_nonzero(latent).item() == 0


def comfy_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """ComfyUI's `prepare_noise`: one float32 draw for the whole batch shape from a CPU generator
    seeded with `seed`, then moved to `device` (so CPU and GPU runs start from the same noise).

    ComfyUI reseeds torch's global generator (`torch.manual_seed`); a fresh CPU generator with the
    same seed gives bit-identical numbers without touching global state (and is thread-safe)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator, device="cpu", dtype=torch.float32)
    return noise.to(device)
