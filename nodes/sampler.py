"""MochiXDiTSampler: text-to-video sampling on the rank pool, with progress and interruption.

The widgets come from `workers.option_table` and the rules from `workers.run_plan.resolve_run`; this
node converts its inputs into a `RunChoices` and hands the plan on.
"""

from ..workers.option_table import Door, node_inputs, widget_problem
from . import checks
from .comfy_types import conditioning_to_text, latent_samples, output_latent
from .inputs import NEGATIVE_INPUT, POOL_INPUT, POSITIVE_INPUT
from .progress import ProgressReporter
from .runs import log_notes, run_sample


def comfy_choices() -> dict[str, list[str]]:
    """ComfyUI's sampler and scheduler names (comfy.samplers.KSampler.SAMPLERS / .SCHEDULERS)."""
    import comfy.samplers

    return {"sampler_name": list(comfy.samplers.KSampler.SAMPLERS),
            "scheduler": list(comfy.samplers.KSampler.SCHEDULERS)}


def masked(latent: dict | None) -> bool:
    """A LATENT with a noise mask or batch index (ComfyUI's own sampler code handles those)."""
    return latent is not None and (latent.get("noise_mask") is not None or latent.get("batch_index") is not None)


def run_choices(seed, steps, cfg, schedule, denoise, cache, cache_threshold, sampler_name, scheduler,
                latent_image=None):
    """The widgets as the run resolver's RunChoices (a prompt saved before `scheduler` existed keeps its
    `schedule`)."""
    from ..workers.run_plan import RunChoices

    return RunChoices(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler or schedule,
                      denoise=denoise, cache=cache, cache_threshold=cache_threshold, masked_latent=masked(latent_image))


def sampler_problem(**values) -> str | None:
    """Queue-time checks: each widget against the table, then the run rules (inputs fed by a link are
    None here: their own checks wait for run time, and a number stands in at its default meanwhile)."""
    from ..workers.option_table import option
    from ..workers.options import OptionsError
    from ..workers.run_plan import resolve_run

    problem = widget_problem(Door.SAMPLER, values, comfy_choices())
    unknown = None in (values["sampler_name"], values["cache"]) or values["scheduler"] is values["schedule"] is None
    if problem or unknown:
        return problem
    for name in ("seed", "steps", "cfg", "denoise"):
        values[name] = option(name).default if values[name] is None else values[name]
    try:
        resolve_run(run_choices(**values))
    except OptionsError as error:
        return str(error)
    return None


class MochiXDiTSampler:
    DESCRIPTION = (
        "Samples a Mochi-1 video latent on the rank pool (all ranks step in lockstep). Replaces "
        "KSampler in the Mochi graph: same CONDITIONING and LATENT types, and the output LATENT "
        "also works with core VAEDecode. The progress bar advances every step; Cancel stops all ranks."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("The denoised video latent [B, 12, T, H/8, W/8] in VAE space.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        widgets = node_inputs(Door.SAMPLER, comfy_choices())
        return {
            "required": {
                "pool": POOL_INPUT,
                "positive": POSITIVE_INPUT,
                "negative": NEGATIVE_INPUT,
                "latent_image": ("LATENT", {
                    "tooltip": "Size and length of the video: EmptyMochiLatentVideo (width/height multiples of "
                               "16, length 6k+1), or a Mochi latent to re-noise (see denoise)."}),
                **widgets["required"],
            },
            "optional": widgets["optional"],
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed, steps, cfg, schedule, denoise, cache="off", cache_threshold=None,
                        sampler_name="euler", scheduler=None):
        return checks.refuse(sampler_problem(seed=seed, steps=steps, cfg=cfg, schedule=schedule, denoise=denoise,
                                             cache=cache, cache_threshold=cache_threshold, sampler_name=sampler_name,
                                             scheduler=scheduler))

    def sample(self, pool, positive, negative, latent_image, seed, steps, cfg, schedule, denoise, cache="off",
               cache_threshold=None, sampler_name="euler", scheduler=None):
        from ..workers.options import OptionsError
        from ..workers.run_plan import SamplerPath, resolve_run

        problem = (sampler_problem(seed=seed, steps=steps, cfg=cfg, schedule=schedule, denoise=denoise, cache=cache,
                                   cache_threshold=cache_threshold, sampler_name=sampler_name, scheduler=scheduler)
                   or checks.latent_problem(latent_image))
        if problem:
            raise ValueError(problem)
        try:
            plan = resolve_run(run_choices(seed, steps, cfg, schedule, denoise, cache, cache_threshold, sampler_name,
                                           scheduler, latent_image))
        except OptionsError as error:
            raise ValueError(str(error)) from None
        log_notes(plan.notes)
        positive_text = conditioning_to_text(positive, "positive")
        negative_text = conditioning_to_text(negative, "negative")
        if plan.path is SamplerPath.ON_RANKS:
            progress = ProgressReporter(plan.steps)  # created here: ComfyUI's hook belongs to this node
            samples = run_sample(pool, positive_text, negative_text, latent_samples(latent_image), plan, progress)
        else:
            from .comfy_sampling import sample_latent  # imports ComfyUI

            samples = sample_latent(pool, positive_text, negative_text, latent_image, seed=plan.seed, steps=plan.steps,
                                    cfg=plan.cfg, sampler_name=plan.sampler_name, scheduler=plan.scheduler,
                                    denoise=plan.denoise)
        return (output_latent(latent_image, samples),)
