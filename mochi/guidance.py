"""The guided prediction: the DiT on both prompts plus the CFG combine, at one sigma.

Both ways of sampling go through `GuidedDiT`: the Euler loop that runs whole on the ranks
(`sampler.DenoiseLoop`) and the single model evaluations a sampler running elsewhere asks for
(ComfyUI's own samplers in the ComfyUI process; `workers/actor.py` `evaluate`).

Conventions. The DiT takes sigma (1 = noise) and predicts genmo's `x0 - noise`; `prediction`
returns that, CFG-combined: pred = u + cfg * (c - u). A sampler that is not ours wants ComfyUI's
"denoised" instead: with x_t = sigma * noise + (1 - sigma) * x0 (rectified flow, ComfyUI CONST),
x0 = x_t + sigma * pred. `denoised` returns that, per sample of a batch. The combine and the
conversion run in fp32 whatever the DiT's compute dtype; under CFG parallelism (ctx.cfg_degree == 2)
each cfg rank runs one branch and `ctx.gather_cfg` gives both to every rank, so every rank holds
the same result.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .parallel.kernel import AttentionConfig
from .text import TextCondition


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast bf16 matmuls, and tests compare at 1e-5), bf16 on GPUs."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def guided_combine(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The CFG combine in fp32: u + scale * (c - u); scale 1 is the conditional prediction alone."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)  # fp32


def denoised_from_prediction(latent: torch.Tensor, sigma: float, prediction: torch.Tensor) -> torch.Tensor:
    """ComfyUI's denoised x0 from genmo's prediction (x0 - noise): x0 = x_t + sigma * pred, fp32."""
    return latent.float() + sigma * prediction.float()


@dataclass(frozen=True)
class EvaluationRequest:
    """What the ranks keep while a sampler elsewhere asks for model evaluations: the two prompts.

    The schedule, the noise and the CFG scale belong to that sampler; each evaluation brings its
    latent, sigmas and scale.

    Args:
        positive: conditional text.
        negative: unconditional text (used when a scale is not 1, or both branches are asked for).
    """

    positive: TextCondition
    negative: TextCondition

    def __post_init__(self):
        for name in ("positive", "negative"):
            if not isinstance(getattr(self, name), TextCondition):
                raise TypeError(f"{name} must be a TextCondition (T5 features + mask), got {type(getattr(self, name))}")


class GuidedDiT:
    """A DiT bound to its two prompts and its parallel context.

    Args:
        model: a MochiDiT (or anything with its call signature).
        positive, negative: the prompts (TextCondition); moved to `device` once.
        ctx: ParallelContext or None for a single device.
        compute_dtype: the DiT's activation dtype; default fp32 on CPU, bf16 on CUDA.
        device: where the DiT runs; default the model's parameter device.
        attention: a `parallel.kernel.AttentionConfig` passed to every DiT call, or None (the
            context's, or auto on one device).
    """

    def __init__(self, model, positive: TextCondition, negative: TextCondition, ctx=None,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 attention=None):
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype or default_compute_dtype(self.device)
        t5_dim = getattr(getattr(model, "config", None), "t5_feat_dim", None)
        for name, text in (("positive", positive), ("negative", negative)):
            if not isinstance(text, TextCondition):
                raise TypeError(f"{name} must be a TextCondition (T5 features + mask), got {type(text)}")
            width = text.features.shape[-1]
            if t5_dim is not None and width != t5_dim:
                raise ValueError(
                    f"{name} text features are {width} wide but this DiT takes {t5_dim} (T5-XXL for "
                    "Mochi); encode the prompt with the text encoder that matches the model"
                )
        self.model = model
        self.ctx = ctx
        if ctx is None:  # one device: resolve the kernel choice once here, not in every forward
            attention = (attention or AttentionConfig()).resolved()
        self.attention = attention
        self.cfg_parallel = ctx is not None and ctx.cfg_degree == 2
        self._texts = {
            "cond": (positive.features.to(self.device), positive.mask.to(self.device)),
            "uncond": (negative.features.to(self.device), negative.mask.to(self.device)),
        }

    def text(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [1, L, 4096], mask [1, L]) of "cond" or "uncond", on the DiT's device."""
        return self._texts[branch]

    def local_branches(self, with_uncond: bool) -> tuple[str, ...]:
        """The branches this rank evaluates: under CFG parallelism its own one (none on the second
        cfg rank when there is no unconditional pass), else every needed one."""
        needed = ("cond", "uncond") if with_uncond else ("cond",)
        if self.cfg_parallel:
            mine = "cond" if self.ctx.cfg_rank == 0 else "uncond"
            return (mine,) if mine in needed else ()
        return needed

    def branch(self, latent: torch.Tensor, sigma: float, branch: str) -> torch.Tensor:
        """One DiT call for one sample: [1, 12, T, H, W] -> prediction [1, 12, T, H, W] fp32."""
        features, mask = self._texts[branch]
        sigma_t = torch.full((1,), sigma, device=self.device, dtype=torch.float32)  # [1]
        pred = self.model(latent.to(self.device, self.compute_dtype), sigma_t, features, mask, ctx=self.ctx,
                          attention=self.attention)
        return pred.float()

    def exchange(self, own: dict[str, torch.Tensor], latent: torch.Tensor,
                 with_uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditional, unconditional) from this rank's own predictions {branch: [1, 12, T, H, W]}:
        under CFG parallelism one all-gather joins the two cfg ranks' (the second sends zeros when
        there is no unconditional pass; every rank must join), else they are already all here."""
        if self.cfg_parallel:
            mine = "cond" if self.ctx.cfg_rank == 0 else "uncond"
            cond, uncond = self.ctx.gather_cfg(own.get(mine, torch.zeros_like(latent, dtype=torch.float32)))
            return cond, (uncond if with_uncond else None)
        return own["cond"], own.get("uncond")

    def branches(self, latent: torch.Tensor, sigma: float, with_uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditional, unconditional) predictions for one sample [1, 12, T, H, W], fp32; the
        unconditional one is None when not asked for."""
        own = {branch: self.branch(latent, sigma, branch) for branch in self.local_branches(with_uncond)}
        return self.exchange(own, latent, with_uncond)

    @torch.no_grad()
    def prediction(self, latent: torch.Tensor, sigma: float, scale: float) -> torch.Tensor:
        """The guided prediction (x0 - noise) for one sample [1, 12, T, H, W], fp32; scale 1 skips
        the unconditional pass."""
        return guided_combine(*self.branches(latent, sigma, with_uncond=scale != 1.0), scale)

    def _per_sample_sigmas(self, latent: torch.Tensor, sigmas: Sequence[float]) -> list[float]:
        B = latent.shape[0]
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) == 1:
            sigmas = sigmas * B
        if len(sigmas) != B:
            raise ValueError(f"{len(sigmas)} sigmas for a batch of {B}; give one sigma, or one per sample")
        return sigmas

    @torch.no_grad()
    def denoised(self, latent: torch.Tensor, sigmas: Sequence[float], scale: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """ComfyUI's denoised x0 of the guided prediction, every sample of a batch.

        Args:
            latent: [B, 12, T, H, W] model-space noisy latent x_t.
            sigmas: one sigma per sample (or one for all).
            scale: CFG scale; 1 skips the unconditional pass.
            out: where to write the result ([B, 12, T, H, W] fp32, any device: a rank passes the
                driver's shared buffer), or None for a new tensor on the DiT's device.

        Returns:
            [B, 12, T, H, W] fp32 x0 = x_t + sigma * (u + scale * (c - u)) (`out` when given).
        """
        sigmas = self._per_sample_sigmas(latent, sigmas)
        if out is None:
            out = torch.empty(latent.shape, dtype=torch.float32, device=self.device)  # [B, 12, T, H, W]
        for b, sigma in enumerate(sigmas):
            sample = latent[b : b + 1].to(self.device, torch.float32)  # [1, 12, T, H, W]
            out[b : b + 1] = denoised_from_prediction(sample, sigma, self.prediction(sample, sigma, scale))
        return out

    @torch.no_grad()
    def denoised_branches(self, latent: torch.Tensor, sigmas: Sequence[float],
                          out: torch.Tensor | None = None) -> torch.Tensor:
        """Both branches' denoised x0 unguided, for samplers that combine them themselves
        (ComfyUI's cfg_pp samplers and CFG hooks need the unconditional x0 too). `out`: as in
        `denoised`, [2, B, 12, T, H, W].

        Returns:
            [2, B, 12, T, H, W] fp32: index 0 conditional, 1 unconditional.
        """
        sigmas = self._per_sample_sigmas(latent, sigmas)
        if out is None:
            out = torch.empty((2, *latent.shape), dtype=torch.float32, device=self.device)  # [2, B, 12, T, H, W]
        for b, sigma in enumerate(sigmas):
            sample = latent[b : b + 1].to(self.device, torch.float32)  # [1, 12, T, H, W]
            cond, uncond = self.branches(sample, sigma, with_uncond=True)
            out[0, b : b + 1] = denoised_from_prediction(sample, sigma, cond)
            out[1, b : b + 1] = denoised_from_prediction(sample, sigma, uncond)
        return out
