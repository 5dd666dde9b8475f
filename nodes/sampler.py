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


def run_choices(values: dict, latent_image=None):
    """The widgets as the run resolver's RunChoices. An optional input the prompt does not send takes
    its declared default; a prompt from before the rename that sends `schedule` and no `scheduler`
    runs with its schedule. A cfg_schedule waits for run time while steps comes from a link (its count
    is checked against steps)."""
    from ..workers.option_table import option
    from ..workers.run_plan import RunChoices

    given = dict(values)
    if given.get("scheduler") is None:
        given["scheduler"] = given.get("schedule")
    given = {name: option(name).default if given.get(name) is None else given[name]
             for name in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "cache")}
    cfg_schedule = values.get("cfg_schedule") if values.get("steps") is not None else None
    return RunChoices(**given, cache_threshold=values.get("cache_threshold"),
                      cfg_schedule=option("cfg_schedule").default if cfg_schedule is None else cfg_schedule,
                      masked_latent=masked(latent_image))


def sampler_problem(values: dict) -> str | None:
    """Queue-time checks: each widget against the table, then the run rules. A None value is an input
    fed by a link or one the prompt leaves out: its own check waits for run time, and its default
    stands in for the rules unless it decides the path (sampler_name, cache)."""
    from ..workers.options import OptionsError
    from ..workers.run_plan import resolve_run

    problem = widget_problem(Door.SAMPLER, values, comfy_choices())
    if problem or values["sampler_name"] is None or values["cache"] is None:
        return problem
    try:
        resolve_run(run_choices(values))
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
            "hidden": widgets["hidden"],
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed, steps, cfg, sampler_name=None, scheduler=None, denoise=None, cache=None,
                        cache_threshold=None, schedule=None, cfg_schedule=None):
        return checks.refuse(sampler_problem(dict(
            seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            cache=cache, cache_threshold=cache_threshold, schedule=schedule, cfg_schedule=cfg_schedule)))

    def sample(self, pool, positive, negative, latent_image, seed, steps, cfg, sampler_name=None, scheduler=None,
               denoise=None, cache=None, cache_threshold=None, schedule=None, cfg_schedule=None):
        from ..workers.options import OptionsError
        from ..workers.run_plan import SamplerPath, resolve_run

        values = dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                      denoise=denoise, cache=cache, cache_threshold=cache_threshold, schedule=schedule,
                      cfg_schedule=cfg_schedule)
        problem = widget_problem(Door.SAMPLER, values, comfy_choices()) or checks.latent_problem(latent_image)
        if problem:
            raise ValueError(problem)
        try:
            plan = resolve_run(run_choices(values, latent_image))
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
