"""MochiXDiTSampler: text-to-video sampling on the rank pool, with progress and interruption."""

from ..mochi.constants import SCHEDULE_NAMES as SCHEDULES
from ..mochi.schedule import parse_cfg_schedule
from . import checks
from .comfy_types import conditioning_to_text, latent_samples, output_latent
from .inputs import CFG_INPUT, MAX_CFG, NEGATIVE_INPUT, POOL_INPUT, POSITIVE_INPUT
from .progress import ProgressReporter
from .runs import run_sample

MAX_STEPS = 1000
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MIN_DENOISE = 0.01
CACHE_CHOICES = ("off", "teacache", "first_block")
DEFAULT_SAMPLER, DEFAULT_SCHEDULER = "euler", "simple"  # core KSampler's defaults for Mochi
# What runs whole on the ranks (one round trip per step, step caching available); any other
# sampler/scheduler runs ComfyUI's own sampler code here with the pool as the model.
ON_RANK_SAMPLER, ON_RANK_SCHEDULERS = "euler", SCHEDULES
DEFAULT_CACHE_THRESHOLD = 0.06  # TeaCache's published Mochi setting (~1.5x); 0.09 gave ~2.1x


def runs_on_ranks(sampler_name: str, scheduler: str, latent: dict | None = None) -> bool:
    """Whether a run takes the on-rank path: euler with genmo's or the simple schedule, and a LATENT
    without a noise mask or batch index (those follow core's code, in ComfyUI's process)."""
    plain = latent is None or (latent.get("noise_mask") is None and latent.get("batch_index") is None)
    return sampler_name == ON_RANK_SAMPLER and scheduler in ON_RANK_SCHEDULERS and plain


def comfy_choices() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (comfy.samplers.KSampler.SAMPLERS / .SCHEDULERS)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def sampler_problem(seed, steps, cfg, schedule, denoise, cache="off", cache_threshold=DEFAULT_CACHE_THRESHOLD,
                    sampler_name=DEFAULT_SAMPLER, scheduler=None, cfg_schedule="") -> str | None:
    """Checks of the widget inputs; None values (inputs fed by a link) are checked at run time."""
    cfg_schedule = (cfg_schedule or "").strip()  # blank = no schedule
    if cfg_schedule and steps is not None:
        if None not in (sampler_name, scheduler) and not runs_on_ranks(sampler_name, scheduler or schedule):
            return (f"cfg_schedule runs on the on-rank path only (sampler_name euler with scheduler simple or "
                    f"linear_quadratic); clear it for {sampler_name} / {scheduler}")
        try:
            parse_cfg_schedule(cfg_schedule, steps)
        except ValueError as error:
            return f"cfg_schedule: {error}"
    if sampler_name is not None or scheduler is not None:
        samplers, schedulers = comfy_choices()
        for name, value, choices in (("sampler_name", sampler_name, samplers), ("scheduler", scheduler, schedulers)):
            problem = None if value is None else checks.choice_problem(name, value, choices)
            if problem:
                return problem
    if cache not in (None, "off") and None not in (sampler_name, scheduler) \
            and not runs_on_ranks(sampler_name, scheduler or schedule):
        return (f"cache={cache!r} runs on the on-rank path only (sampler_name euler with scheduler simple or "
                f"linear_quadratic); set cache to off for {sampler_name} / {scheduler}")
    checks_to_run = (
        (cache, lambda: checks.choice_problem("cache", cache, CACHE_CHOICES)),
        (cache_threshold, lambda: checks.float_problem("cache_threshold", cache_threshold, 0.0, 1.0)),
        (seed, lambda: checks.int_problem("seed", seed, 0, MAX_SEED)),
        (steps, lambda: checks.int_problem("steps", steps, 1, MAX_STEPS)),
        (cfg, lambda: checks.float_problem("cfg", cfg, 0.0, MAX_CFG)),
        (schedule, lambda: checks.choice_problem("schedule", schedule, SCHEDULES)),
        (denoise, lambda: checks.float_problem("denoise", denoise, MIN_DENOISE, 1.0)),
    )
    for value, check in checks_to_run:
        problem = None if value is None else check()
        if problem:
            return problem
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
        return {
            "required": {
                "pool": POOL_INPUT,
                "positive": POSITIVE_INPUT,
                "negative": NEGATIVE_INPUT,
                "latent_image": ("LATENT", {
                    "tooltip": "Size and length of the video: EmptyMochiLatentVideo (width/height multiples of "
                               "16, length 6k+1), or a Mochi latent to re-noise (see denoise)."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Seed of the starting noise (drawn like KSampler: same seed, same noise)."}),
                "steps": ("INT", {
                    "default": 64, "min": 1, "max": MAX_STEPS, "step": 1,
                    "tooltip": "Denoising steps. Mochi's default is 64; fewer is faster and blurrier. Time "
                               "grows linearly with steps."}),
                "cfg": CFG_INPUT,
                "schedule": (list(SCHEDULES), {
                    "default": "linear_quadratic",
                    "tooltip": "linear_quadratic: genmo's Mochi schedule (slow start, then quadratic). simple: "
                               "ComfyUI's KSampler schedule for Mochi (flow shift 6). The scheduler input, when "
                               "present, supersedes this one (kept so saved workflows keep working)."}),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": MIN_DENOISE, "max": 1.0, "step": 0.01,
                    "tooltip": "1 starts from pure noise. Below 1 keeps that much of a non-empty input latent "
                               "(video-to-video); the run then covers the last steps of a longer schedule."}),
            },
            "optional": {
                "sampler_name": (comfy_choices()[0], {
                    "default": DEFAULT_SAMPLER,
                    "tooltip": "ComfyUI's sampler, as in KSampler. euler with scheduler simple or linear_quadratic "
                               "runs whole on the ranks; any other runs ComfyUI's own sampler code with every "
                               "model evaluation done in lockstep on the pool (CFG on the ranks)."}),
                "scheduler": (comfy_choices()[1], {
                    "default": DEFAULT_SCHEDULER,
                    "tooltip": "ComfyUI's scheduler, as in KSampler (simple: KSampler's Mochi default; "
                               "linear_quadratic: genmo's schedule). Supersedes 'schedule', which only applies "
                               "to prompts saved before this input existed."}),
                "cache": (list(CACHE_CHOICES), {
                    "default": "off",
                    "tooltip": "Step caching: skip the transformer's blocks on steps where their input barely "
                               "changes, reusing the last computed residual; every rank skips the same steps. "
                               "teacache: TeaCache's Mochi indicator (published 1.5x at 0.06, 2.1x at 0.09 on "
                               "163 frames). first_block: compares the first block's output. off: every step."}),
                "cache_threshold": ("FLOAT", {
                    "default": DEFAULT_CACHE_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "How much change a skipped step may hide: higher skips more steps (faster) and "
                               "drifts further from the uncached video. 0 never skips."}),
                "cfg_schedule": ("STRING", {
                    "default": "",
                    "tooltip": "One cfg per step instead of cfg, e.g. 4.5*40,1*24 (scale*steps, comma-separated; "
                               "the counts add up to steps). Steps at 1 skip the negative pass. Empty: cfg for "
                               "every step. On-rank path only (euler with simple / linear_quadratic)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed, steps, cfg, schedule, denoise, cache="off", cache_threshold=DEFAULT_CACHE_THRESHOLD,
                        sampler_name=DEFAULT_SAMPLER, scheduler=None, cfg_schedule=""):
        return checks.refuse(sampler_problem(seed, steps, cfg, schedule, denoise, cache, cache_threshold,
                                             sampler_name, scheduler, cfg_schedule))

    def sample(self, pool, positive, negative, latent_image, seed, steps, cfg, schedule, denoise, cache="off",
               cache_threshold=DEFAULT_CACHE_THRESHOLD, sampler_name=DEFAULT_SAMPLER, scheduler=None, cfg_schedule=""):
        scheduler = scheduler or schedule  # prompts saved before `scheduler` existed keep their schedule
        cfg_schedule = (cfg_schedule or "").strip()
        problem = (sampler_problem(seed, steps, cfg, schedule, denoise, cache, cache_threshold, sampler_name,
                                   scheduler, cfg_schedule) or checks.latent_problem(latent_image))
        if problem:
            raise ValueError(problem)
        if (cache != "off" or cfg_schedule) and not runs_on_ranks(sampler_name, scheduler, latent_image):
            raise ValueError("step caching and cfg_schedule run on the on-rank path only, and this LATENT carries a "
                             "noise_mask or batch_index (ComfyUI's own sampler code handles those); set cache to off "
                             "and clear cfg_schedule")
        positive_text = conditioning_to_text(positive, "positive")
        negative_text = conditioning_to_text(negative, "negative")
        if runs_on_ranks(sampler_name, scheduler, latent_image):
            progress = ProgressReporter(steps)  # created here: ComfyUI's hook belongs to this node
            samples = run_sample(pool, positive_text, negative_text, latent_samples(latent_image), seed=seed,
                                 steps=steps, cfg=parse_cfg_schedule(cfg_schedule, steps) if cfg_schedule else cfg,
                                 schedule=scheduler, denoise=denoise, progress=progress,
                                 cache=cache, cache_threshold=cache_threshold)
        else:
            from .comfy_sampling import sample_latent  # imports ComfyUI

            samples = sample_latent(pool, positive_text, negative_text, latent_image, seed=seed, steps=steps, cfg=cfg,
                                    sampler_name=sampler_name, scheduler=scheduler, denoise=denoise)
        return (output_latent(latent_image, samples),)
