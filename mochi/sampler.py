"""Euler sampling of Mochi as a stepwise loop: `begin()`, `step(i)` for each step, `finish()`.

The Ray actors drive this loop in lockstep (one `step` per call), the single-process pipeline runs
it straight through; both go through the same code. Conventions (genmo): the DiT takes sigma
(1 = noise) and predicts `x0 - noise`; one Euler step is z <- z + (sigma_i - sigma_{i+1}) * pred with
pred = u + cfg_i * (c - u), done in fp32 whatever the compute dtype (`guidance.GuidedDiT`, shared with the
model evaluations ComfyUI's own samplers ask the pool for). Noise, img2img noising and the
latent spaces follow ComfyUI exactly (see `latent.py`), so the same seed gives the same start as
core KSampler.
"""

from dataclasses import dataclass

import torch

from .constants import DEFAULT_CFG, DEFAULT_STEPS, LATENT_CHANNELS, PATCH_SIZE, SIZE_MULTIPLE, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from .guidance import GuidedDiT, default_compute_dtype, guided_combine  # noqa: F401 (default_compute_dtype: re-exported)
from .latent import comfy_noise, is_empty_latent, to_model_space, to_vae_space
from .schedule import SCHEDULES, cfg_schedule, sigma_schedule
from .step_cache import CacheStats, Evaluation, StepCache, StepCacheSpec
from .text import TextCondition


class VideoSizeError(ValueError):
    """A video size Mochi cannot make; `dimension` is "width", "height" or "frames" (a front door names
    its own input)."""

    def __init__(self, dimension: str, message: str):
        self.dimension = dimension
        super().__init__(message)


def latent_shape_for_video(width: int, height: int, frames: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """[B, 12, T, H/8, W/8] for a video of `frames` = 6T - 5 frames, checking Mochi's size rules
    (VideoSizeError says which dimension and the nearest sizes that work)."""
    if frames < 1 or (frames - 1) % TEMPORAL_COMPRESSION:
        lower = max(1, (frames - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1)
        raise VideoSizeError(
            "frames", f"frames={frames}: Mochi makes 6k+1 frames; use {lower} or {lower + TEMPORAL_COMPRESSION}"
        )
    for name, value in (("width", width), ("height", height)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise VideoSizeError(
                name, f"{name}={value} must be a multiple of {SIZE_MULTIPLE}; use {lower} or {lower + SIZE_MULTIPLE}"
            )
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    T = (frames - 1) // TEMPORAL_COMPRESSION + 1
    return (batch, LATENT_CHANNELS, T, height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)


def _check_latent_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 5:
        raise ValueError(f"{what} must be [B, {LATENT_CHANNELS}, T, H, W] (5 dims), got {list(shape)}")
    B, C, T, H, W = shape
    if B < 1 or T < 1:
        raise ValueError(f"{what} {list(shape)} needs batch >= 1 and latent frames T >= 1 (video frames 6T-5)")
    if C != LATENT_CHANNELS:
        raise ValueError(f"{what} has {C} channels; Mochi latents have {LATENT_CHANNELS} (EmptyMochiLatentVideo)")
    for name, value in (("height", H), ("width", W)):
        if value < PATCH_SIZE or value % PATCH_SIZE:
            raise ValueError(
                f"{what} {name} {value} must be even (the DiT uses 2x2 patches): make the video {name} a "
                f"multiple of {SIZE_MULTIPLE} pixels"
            )


@dataclass(frozen=True)
class SampleRequest:
    """One generation, validated up front so nothing fails mid-run.

    Args:
        positive: conditional text.
        negative: unconditional text (unused when every cfg is 1).
        latent_shape: [B, 12, T, H, W] to start from pure noise (see `latent_shape_for_video`);
            give this or `init_latent`.
        init_latent: [B, 12, T, H, W] VAE-space LATENT (ComfyUI convention). All zero (an empty
            latent) is left alone; anything else is normalised to model space and noised to the
            first sigma: x = sigma*noise + (1-sigma)*x0 (use denoise < 1 to keep some of it).
        seed: noise seed (ComfyUI's: a CPU generator, one draw for the whole batch).
        steps: Euler steps actually run.
        cfg: guidance scale, or one per step; 1 skips the unconditional pass.
        schedule: "linear_quadratic" (genmo) or "simple" (ComfyUI's flow schedule, shift 6).
        denoise: in (0, 1]; < 1 starts part-way down the schedule like ComfyUI's KSampler.
        cache: step caching (`step_cache.StepCacheSpec`: TeaCache or first-block cache and a
            threshold), or None for every step in full. Every rank of a pool skips the same steps.
    """

    positive: TextCondition
    negative: TextCondition
    latent_shape: tuple[int, ...] | None = None
    init_latent: torch.Tensor | None = None
    seed: int = 0
    steps: int = DEFAULT_STEPS
    cfg: float | tuple[float, ...] = DEFAULT_CFG
    schedule: str = "linear_quadratic"
    denoise: float = 1.0
    cache: StepCacheSpec | None = None

    def __post_init__(self):
        for name in ("positive", "negative"):
            if not isinstance(getattr(self, name), TextCondition):
                raise TypeError(f"{name} must be a TextCondition (T5 features + mask), got {type(getattr(self, name))}")
        if (self.latent_shape is None) == (self.init_latent is None):
            raise ValueError("give exactly one of latent_shape (start from noise) or init_latent (a LATENT)")
        if self.init_latent is not None:
            if not isinstance(self.init_latent, torch.Tensor) or not self.init_latent.is_floating_point():
                raise ValueError("init_latent must be a float tensor [B, 12, T, H, W] (a LATENT's samples)")
            _check_latent_shape(tuple(self.init_latent.shape), "init_latent")
        else:
            shape = tuple(int(v) for v in self.latent_shape)
            _check_latent_shape(shape, "latent_shape")
            object.__setattr__(self, "latent_shape", shape)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**64)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be a positive integer (Mochi's default is {DEFAULT_STEPS})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.denoise, (int, float)) and 0.0 < self.denoise <= 1.0):
            raise ValueError(f"denoise={self.denoise!r} must be in (0, 1]; 1 generates from pure noise")
        if not isinstance(self.cfg, (int, float)):
            object.__setattr__(self, "cfg", tuple(float(v) for v in self.cfg))
        cfg_schedule(self.cfg, self.steps)  # raises on a wrong length or a negative scale
        if self.cache is not None and not isinstance(self.cache, StepCacheSpec):
            raise TypeError(
                f"cache must be a StepCacheSpec (e.g. StepCacheSpec.default(StepCacheKind.TEACACHE)) or None "
                f"for no step caching, got {type(self.cache).__name__}"
            )

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """[B, 12, T, H, W] of the latent being sampled."""
        return tuple(self.init_latent.shape) if self.init_latent is not None else self.latent_shape

    @property
    def sigmas(self) -> list[float]:
        """steps + 1 sigmas, descending to 0."""
        return sigma_schedule(self.schedule, self.steps, self.denoise)

    @property
    def cfg_scales(self) -> list[float]:
        return cfg_schedule(self.cfg, self.steps)

    @property
    def uses_cfg(self) -> bool:
        """False when every step has cfg 1 (no unconditional pass at all)."""
        return any(scale != 1.0 for scale in self.cfg_scales)


class DenoiseLoop:
    """Euler sampling driven one step at a time.

    Usage: `loop.begin()`, then `loop.step(i)` for i = 0 .. num_steps - 1 in order, then
    `loop.finish()` for the VAE-space result. Every rank of a parallel run drives its own loop with
    the same request; under CFG parallelism (ctx.cfg_degree == 2) cfg rank 0 evaluates only the
    conditional branch and rank 1 only the unconditional one, and `ctx.gather_cfg` joins them
    (at a cfg-1 step rank 1 sends zeros: the unconditional prediction is not used). With
    `request.cache` set, a `StepCache` made by `begin()` decides per step whether the DiT's blocks run
    or their cached residual is reused; `cache_stats` says which steps were skipped.

    Args:
        model: a MochiDiT (or anything with its call signature).
        request: the SampleRequest.
        ctx: ParallelContext or None for a single device.
        compute_dtype: the DiT's activation dtype; default fp32 on CPU, bf16 on CUDA. The CFG
            combine and the Euler update are always fp32.
        device: where sampling runs; default the model's parameter device.
        attention: a `parallel.kernel.AttentionConfig` for the model's attention (the requested
            backend), or None for the context's, or auto on one device; passed to every model call.
    """

    def __init__(self, model, request: SampleRequest, ctx=None, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, attention=None):
        if not isinstance(request, SampleRequest):
            raise TypeError(f"request must be a SampleRequest, got {type(request)}")
        self.guided = GuidedDiT(model, request.positive, request.negative, ctx=ctx, compute_dtype=compute_dtype,
                                device=device, attention=attention)  # checks the text width against the DiT
        self.device = self.guided.device
        self.compute_dtype = self.guided.compute_dtype
        self.model = model
        self.request = request
        self.ctx = ctx
        self.attention = attention
        # Under a CFG split a step with cfg 1 has no unconditional pass: cfg rank 0 computes the
        # conditional one and rank 1 sends zeros (any cfg runs on any pool; workers.options says
        # which layout would be faster).
        self.cfg_parallel = self.guided.cfg_parallel
        self.sigmas = request.sigmas
        self.cfg_scales = request.cfg_scales
        self.num_steps = len(self.sigmas) - 1
        self._latent = None  # [B, 12, T, H, W] fp32, model space
        self._next_step = None
        self._cache = None  # StepCache of the current run when request.cache is set

    @torch.no_grad()
    def begin(self) -> None:
        """Draw the noise (ComfyUI's way) and build the starting latent in model space."""
        request = self.request
        noise = comfy_noise(request.shape, request.seed, self.device)  # [B, 12, T, H, W] fp32
        if request.init_latent is None:
            clean = torch.zeros_like(noise)
        else:
            clean = request.init_latent.to(self.device, torch.float32)
            if not is_empty_latent(clean):  # ComfyUI never shifts an empty latent
                clean = to_model_space(clean)
        sigma = self.sigmas[0]
        self._latent = sigma * noise + (1.0 - sigma) * clean  # ComfyUI CONST.noise_scaling
        self._next_step = 0
        self._cache = (None if request.cache is None
                       else StepCache(request.cache, self.num_steps, self.ctx, attention=self.attention))

    @torch.no_grad()
    def step(self, i: int) -> None:
        """Euler step i: from sigmas[i] to sigmas[i + 1], every sample of the batch."""
        if self._next_step is None:
            raise RuntimeError(f"step({i}) before begin(); call begin() first")
        if i != self._next_step:
            raise RuntimeError(
                f"step({i}) out of order: the next step is {self._next_step} of {self.num_steps}; "
                "steps run 0, 1, ... in order"
            )
        sigma, sigma_next, scale = self.sigmas[i], self.sigmas[i + 1], self.cfg_scales[i]
        batch = self._latent.shape[0]
        needed = ("cond",) if scale == 1.0 else ("cond", "uncond")  # cfg 1: no unconditional pass
        local = self.guided.local_branches(with_uncond=scale != 1.0)
        calls = [(b, branch) for b in range(batch) for branch in local]
        predictions = self._predict_all(i, sigma, calls, [(b, branch) for b in range(batch) for branch in needed])
        for b in range(batch):
            latent = self._latent[b : b + 1]  # [1, 12, T, H, W] fp32
            own = {branch: predictions[(b, branch)] for branch in local}
            pred = guided_combine(*self.guided.exchange(own, latent, scale != 1.0), scale)  # fp32
            self._latent[b : b + 1] = latent + (sigma - sigma_next) * pred  # fp32 Euler
        self._next_step = i + 1

    def _predict_all(self, i: int, sigma: float, calls: list, needed: list) -> dict:
        """{(sample, branch): fp32 prediction} for this rank's calls of step i; through the step
        cache when one is on (every rank enters it, even with no call of its own)."""
        if self._cache is None:
            return {(b, branch): self.guided.branch(self._latent[b : b + 1], sigma, branch) for b, branch in calls}
        sigma_t = torch.full((1,), sigma, device=self.device, dtype=torch.float32)
        evaluations = [
            Evaluation((b, branch), self._latent[b : b + 1].to(self.compute_dtype), sigma_t,
                       *self.guided.text(branch))
            for b, branch in calls
        ]
        predictions = self._cache.predict(self.model, i, evaluations, needed)
        return {key: pred.float() for key, pred in predictions.items()}

    @property
    def cache_stats(self) -> CacheStats:
        """Steps computed and skipped so far in this run (all computed without a cache); the same on
        every rank of a pool."""
        if self._cache is not None:
            return self._cache.stats
        return CacheStats(computed=tuple(range(self._next_step or 0)))

    @property
    def latent(self) -> torch.Tensor:
        """Current model-space latent [B, 12, T, H, W] fp32 (e.g. for previews)."""
        if self._latent is None:
            raise RuntimeError("no latent before begin(); call begin() first")
        return self._latent

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """The VAE-space result [B, 12, T, H, W] fp32 (a LATENT's samples). Needs every step run."""
        if self._next_step is None:
            raise RuntimeError("finish() before begin(); call begin() and run every step first")
        if self._next_step != self.num_steps:
            raise RuntimeError(
                f"finish() after {self._next_step} of {self.num_steps} steps; run the remaining steps first"
            )
        return to_vae_space(self._latent)
