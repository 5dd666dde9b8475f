"""The nodes' calls into the pool: open it (loader), sample (sampler), decode (decoder), encode (encoder).

Each call looks the pool up through the handle, checks what the pool's layout cannot run before
the pool is touched, and lets `errors.user_errors` give failures their advice.
"""

import logging

import torch

from ..mochi.text import TextCondition
from .errors import user_errors
from .handle import PoolHandle, pool_for

logger = logging.getLogger("mochi_xdit")


def open_pool(spec) -> PoolHandle:
    """Build (or reuse) the pool for a resolved spec; weights are loaded before returning."""
    from ..workers.service import default_service

    with user_errors():
        default_service().open(spec)
    return PoolHandle(spec)


def run_sample(handle: PoolHandle, positive: TextCondition, negative: TextCondition, samples: torch.Tensor, *,
               seed: int, steps: int, cfg: float | tuple[float, ...], schedule: str, denoise: float, progress, cache: str = "off",
               cache_threshold: float | None = None) -> torch.Tensor:
    """Sample on the pool with the handle's LoRAs; returns VAE-space samples [B, 12, T, H, W] float32 on CPU.

    Args:
        progress: a `progress.ProgressReporter` (the pool's per-step callback).
        cfg: one scale, or one per step (a parsed cfg_schedule).
        cache, cache_threshold: the step cache ("off", "teacache", "first_block").
    """
    from ..mochi.sampler import SampleRequest
    from ..workers.options import OptionsError, layout_note, resolve_cache, sequence_problem

    problem = sequence_problem(handle.spec.parallel, tuple(samples.shape))
    if problem:
        raise ValueError(problem)
    try:
        step_cache = resolve_cache(cache, cache_threshold)
    except OptionsError as error:
        raise ValueError(str(error)) from None
    request = SampleRequest(positive=positive, negative=negative, init_latent=samples, seed=seed, steps=steps,
                            cfg=cfg, schedule=schedule, denoise=denoise, cache=step_cache)
    note = layout_note(handle.spec.parallel, request.uses_cfg)
    if note:
        logger.info(f"Mochi xDiT: {note}")
    with user_errors():
        pool = pool_for(handle)
        result = pool.run(request, progress, preview=progress.wants_preview, loras=handle.loras)
    if result.cache_stats is not None:
        logger.info(f"Mochi xDiT: step cache ({cache}, threshold {cache_threshold:g}): {result.cache_stats}")
    return result.latent.to("cpu", torch.float32)


def run_decode(handle: PoolHandle, samples: torch.Tensor, tiles) -> torch.Tensor:
    """Decode VAE-space samples [B, 12, T, H, W] on the pool -> video [B, 3, 6T-5, 8H, 8W] in [-1, 1].
    tiles: a `mochi.vae_tiling.TileSpec`, or None for the automatic choice."""
    with user_errors():
        return pool_for(handle).decode(samples, tiles)


def run_encode(handle: PoolHandle, video: torch.Tensor, tiles) -> torch.Tensor:
    """Encode a video [B, 3, F, H, W] in [-1, 1] on the pool -> VAE-space latent mean [B, 12, T, H/8, W/8].
    tiles: a `mochi.vae_encoder_tiling.EncodeTileSpec`, or None for the automatic choice.

    A pool whose VAE file has no encoder is refused before the pool is touched (CheckpointError, a
    ValueError whose message names the files that carry one)."""
    from ..mochi.checkpoint import require_vae_encoder

    if handle.spec.vae_path is None:
        raise ValueError("Mochi xDiT: this pool has no VAE; pick mochi_vae.safetensors in the loader's vae_name")
    require_vae_encoder(handle.spec.vae_path)
    with user_errors():
        return pool_for(handle).encode(video, tiles)
