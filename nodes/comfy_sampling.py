"""ComfyUI's own samplers and schedulers with the rank pool as the model.

ComfyUI's sampler code (k-diffusion samplers, UniPC, schedulers, noise, inpainting masks) runs
here, in the ComfyUI process, exactly as core KSampler / SamplerCustomAdvanced run it; each model
evaluation it asks for is one lockstep DiT forward on all ranks (`workers.pool.Pool.evaluations`:
CFG split and sequence parallelism inside, the CFG combine on the ranks), which returns ComfyUI's
denoised x0. The ranks never import ComfyUI.

The model ComfyUI sees is its own Mochi model object (`comfy.model_base.GenmoMochi`: flow model
sampling with shift 6, the Mochi latent format, inpainting scaling), built without its diffusion
model: `PoolGuider.predict_noise` answers every evaluation from the pool instead. Nothing of
ComfyUI's sampling is re-implemented here.

This module imports ComfyUI when imported: import it inside node methods only (the package must
also import where ComfyUI is absent).
"""

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import latent_preview
import torch

from ..mochi.text import TextCondition
from .checks import latent_problem
from .comfy_types import conditioning_to_text
from .errors import user_errors
from .handle import pool_for

# model_options keys through which a sampler (the cfg_pp ones) or a model patch needs the two
# branches' x0 separately; with any of them the ranks return both and ComfyUI combines them.
CFG_HOOKS = ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function")
DRIVER_DEVICE = torch.device("cpu")  # the sampler's own arithmetic on latents: cheap, leaves GPUs to the ranks


class PoolStandIn(torch.nn.Module):
    """Takes the diffusion model's place in ComfyUI's Mochi model object: the pool evaluates the
    model, through `PoolGuider`; a direct call means a path that bypassed the guider."""

    dtype = torch.float32  # what ComfyUI reads as the model's dtype (latents stay fp32 here)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "the Mochi xDiT pool stands in for this model: it is evaluated through MochiXDiTGuider / "
            "MochiXDiTSampler only, not as a MODEL for other nodes"
        )


def mochi_model_patcher() -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's Mochi model (model sampling flow shift 6 from `supported_models.GenmoMochi`, latent
    format, inpainting) in a ModelPatcher, with `PoolStandIn` as its diffusion model; on the CPU."""
    config = comfy.supported_models.GenmoMochi({"image_model": "mochi_preview", "disable_unet_model_creation": True})
    model = comfy.model_base.GenmoMochi(config, device=DRIVER_DEVICE)
    model.diffusion_model = PoolStandIn()
    return comfy.model_patcher.ModelPatcher(model, load_device=DRIVER_DEVICE, offload_device=DRIVER_DEVICE)


def _conditioning(text: TextCondition) -> list:
    """A TextCondition as ComfyUI's CONDITIONING, for ComfyUI's own bookkeeping of the conds."""
    return [[text.features, {"attention_mask": text.mask, "pooled_output": None}]]


class PoolGuider(comfy.samplers.CFGGuider):
    """A GUIDER (what SamplerCustomAdvanced and KSampler's sampling run) whose model calls are
    lockstep evaluations on the pool.

    Everything but the model call is ComfyUI's CFGGuider: conds, noise scaling, inpainting masks,
    sampler wrappers, latent in/out. `predict_noise` asks the ranks for the CFG-combined denoised
    x0; when a sampler hooks the CFG combine (cfg_pp samplers), the ranks return both branches and
    ComfyUI's `sampling_function` combines them.

    Args:
        handle: the pool handle (`nodes.handle.PoolHandle`; its LoRAs are applied).
        positive, negative: the prompts as TextConditions (`comfy_types.conditioning_to_text`).
    """

    def __init__(self, handle, positive: TextCondition, negative: TextCondition):
        super().__init__(mochi_model_patcher())
        self.handle = handle
        self._set_texts(positive, negative)
        self._evaluate = None  # the pool's evaluation function while sample() runs

    def _set_texts(self, positive: TextCondition, negative: TextCondition) -> None:
        self.texts = (positive, negative)
        self.inner_set_conds({"positive": _conditioning(positive), "negative": _conditioning(negative)})

    def set_conds(self, positive, negative):
        """CONDITIONING (from CLIPTextEncode), as for core's CFGGuider."""
        self._set_texts(conditioning_to_text(positive, "positive"), conditioning_to_text(negative, "negative"))

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        from ..workers.options import sequence_problem

        problem = latent_problem({"samples": latent_image}) or sequence_problem(self.handle.spec.parallel,
                                                                                tuple(latent_image.shape))
        if problem:
            raise ValueError(problem)
        with user_errors():
            pool = pool_for(self.handle)
            with pool.evaluations(*self.texts, loras=self.handle.loras) as evaluate:
                self._evaluate = evaluate
                try:
                    return super().sample(noise, latent_image, sampler, sigmas, denoise_mask=denoise_mask,
                                          callback=callback, disable_pbar=disable_pbar, seed=seed)
                finally:
                    self._evaluate = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        """Denoised x0 [B, 12, T, H, W] (model space) of one model evaluation, from the pool."""
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between evaluations
        if self._evaluate is None:
            raise RuntimeError("PoolGuider evaluates the model only inside sample(); call guider.sample(...)")
        if "sampler_calc_cond_batch_function" in model_options:
            raise ValueError(
                "a model patch replaces ComfyUI's cond batching (sampler_calc_cond_batch_function); the Mochi "
                "xDiT pool evaluates the model itself and cannot run it: remove that patch node"
            )
        if not any(key in model_options for key in CFG_HOOKS):
            return self._evaluate(x, timestep, self.cfg).to(x)  # combined on the ranks (cfg 1: no uncond pass)
        options = dict(model_options)
        options["sampler_calc_cond_batch_function"] = self._branches
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), self.cfg, model_options=options,
                                                seed=seed)

    def _branches(self, args) -> list:
        """ComfyUI's calc_cond_batch contract ([cond x0, uncond x0], zeros for a skipped cond),
        answered by the pool."""
        cond, uncond = args["conds"]
        x, sigma = args["input"], args["sigma"]
        if uncond is None:  # cfg 1 and the sampler allows skipping it, like core
            return [self._evaluate(x, sigma, 1.0).to(x), torch.zeros_like(x)]
        both = self._evaluate(x, sigma, None).to(x)  # [2, B, 12, T, H, W]
        return [both[0], both[1]]


def sample_latent(handle, positive: TextCondition, negative: TextCondition, latent: dict, *, seed: int, steps: int,
                  cfg: float, sampler_name: str, scheduler: str, denoise: float, callback=None) -> torch.Tensor:
    """Core KSampler's sampling (nodes.common_ksampler + comfy.sample.sample) with the pool as the model.

    Noise from `comfy.sample.prepare_noise` (honours the LATENT's batch_index), sigmas from core's
    KSampler for this sampler/scheduler/denoise (`comfy.samplers.calculate_sigmas`, the penultimate
    sigma dropped for dpm_2 / uni_pc like core), the LATENT's noise_mask inpaints like core, and the
    sampler from `comfy.samplers.sampler_object`; ancestral/SDE noise comes from `seed`.

    Args:
        handle: the pool handle.
        positive, negative: TextConditions.
        latent: the LATENT dict (VAE space; "samples", optional "batch_index", "noise_mask").
        seed, steps, cfg, denoise: as KSampler's.
        sampler_name: one of comfy.samplers.KSampler.SAMPLERS; scheduler: one of .SCHEDULERS.
        callback: ComfyUI's sampler callback (step, x0, x, total_steps); default core's
            `latent_preview.prepare_callback` (progress bar, previews; every update is also a Cancel
            point).

    Returns:
        VAE-space samples [B, 12, T, H, W] float32 on ComfyUI's intermediate device.
    """
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"sampler_name={sampler_name!r} is not one of ComfyUI's samplers: "
                         f"{', '.join(comfy.samplers.KSampler.SAMPLERS)}")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not one of ComfyUI's schedulers: "
                         f"{', '.join(comfy.samplers.KSampler.SCHEDULERS)}")
    guider = PoolGuider(handle, positive, negative)
    guider.set_cfg(cfg)
    patcher = guider.model_patcher
    latent_image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.KSampler(patcher, steps=steps, device=patcher.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=patcher.model_options).sigmas
    if callback is None:
        callback = latent_preview.prepare_callback(patcher, steps)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())
