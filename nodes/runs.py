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


def run_sample(handle: PoolHandle, positive: TextCondition, negative: TextCondition, samples: torch.Tensor, plan,
               progress) -> torch.Tensor:
    """Sample on the pool with the handle's LoRAs; returns VAE-space samples [B, 12, T, H, W] float32 on CPU.

    Args:
        samples: the input LATENT's samples [B, 12, T, H, W] (all zero: start from noise).
        plan: the resolved run (`workers.run_plan.RunPlan`, on-rank path).
        progress: a `progress.ProgressReporter` (the pool's per-step callback).
    """
    from ..workers.options import sequence_problem
    from ..workers.run_plan import layout_note

    problem = sequence_problem(handle.spec.parallel, tuple(samples.shape))
    if problem:
        raise ValueError(problem)
    log_notes((layout_note(handle.spec.parallel, plan.uses_cfg),))
    request = plan.sample_request(positive, negative, init_latent=samples)
    with user_errors():
        pool = pool_for(handle)
        result = pool.run(request, progress, preview=progress.wants_preview, loras=handle.loras)
    if result.cache_stats is not None:
        logger.info(f"Mochi xDiT: step cache ({plan.cache.kind.value}, threshold {plan.cache.threshold:g}): "
                    f"{result.cache_stats}")
    return result.latent.to("cpu", torch.float32)


def log_notes(notes) -> None:
    """The resolvers' notes (the run goes ahead) in ComfyUI's log."""
    for note in notes:
        if note:
            logger.info(f"Mochi xDiT: {note}")


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
