"""Single-process Mochi: text conditioning + a latent request in, a VAE-space latent out, frames out.

No Ray, no ComfyUI: the CLI's single-rank path, the tests' oracle for the parallel pool, and the
reference for what every rank of the pool computes.
"""

from collections.abc import Callable

import torch

from .sampler import DenoiseLoop, SampleRequest
from .vae_tiling import decode_tiled


def generate(
    dit,
    request: SampleRequest,
    ctx=None,
    callback: Callable[[int, int], None] | None = None,
    compute_dtype: torch.dtype | None = None,
    attention=None,
) -> torch.Tensor:
    """Run every Euler step of `request` on `dit`.

    Args:
        dit: a MochiDiT (e.g. from `checkpoint.load_dit`).
        request: the SampleRequest (text, latent shape or input latent, seed, steps, cfg, schedule).
        ctx: ParallelContext for a sequence / CFG parallel run, or None for one device.
        callback: called as callback(steps_done, total_steps) after each step (progress bars).
        compute_dtype: DiT activation dtype; default fp32 on CPU, bf16 on CUDA.
        attention: a `parallel.kernel_choice.KernelChoice` (the attention kernel choice), or None for
            the version guess of the context's backend (auto on one device).

    Returns:
        [B, 12, T, H, W] fp32 VAE-space latent (what a ComfyUI LATENT holds).
    """
    loop = DenoiseLoop(dit, request, ctx=ctx, compute_dtype=compute_dtype, attention=attention)
    loop.begin()
    for i in range(loop.num_steps):
        loop.step(i)
        if callback is not None:
            callback(i + 1, loop.num_steps)
    return loop.finish()


@torch.no_grad()
def decode_frames(vae_decoder, latent: torch.Tensor, tiles=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a VAE-space latent to video frames, as ComfyUI's VAEDecode presents them.

    Args:
        vae_decoder: a MochiVAEDecoder (e.g. from `checkpoint.load_vae_decoder`).
        latent: [B, 12, T, H, W] VAE-space latent.
        tiles: a `vae_tiling.TileSpec` for bounded-memory tiled decoding, or None.
        dtype: decoder compute dtype; default the decoder's weight dtype.

    Returns:
        [B * (6T - 5), 8H, 8W, 3] float32 in [0, 1]: (x + 1) / 2 clamped (ComfyUI process_output),
        the batch's videos one after another like VAEDecode's IMAGE.
    """
    if dtype is None:
        dtype = next(vae_decoder.parameters()).dtype
    device = next(vae_decoder.parameters()).device
    latent = latent.to(device, dtype)
    video = vae_decoder.decode(latent) if tiles is None else decode_tiled(vae_decoder, latent, tiles)  # [B, 3, F, 8H, 8W]
    frames = video.float().permute(0, 2, 3, 4, 1).flatten(0, 1)  # [B*F, 8H, 8W, 3]
    return ((frames + 1.0) / 2.0).clamp(0.0, 1.0)
