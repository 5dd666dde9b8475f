"""Where a run is resolved: the sampling choices in, a `RunPlan` out (the pool's twin is `options.py`).

Both front doors (the sampler node's widgets, the CLI's flags) only convert their inputs into a
`RunChoices`; every rule about a run lives here once: the limits (from `option_table`), what runs
where (the on-rank Euler loop or ComfyUI's sampler code evaluating on the pool), the step cache,
the defaults that depend on the model (the demo model's short run), and the notes a user should
see (a threshold without a cache, a cfg-1 run on a CFG split).
"""

from dataclasses import dataclass
from enum import Enum

from ..mochi.constants import DEFAULT_CFG, DEFAULT_STEPS, SCHEDULE_NAMES
from .choices import CACHE_CHOICES
from .option_table import Field, option, value_problem
from .options import OptionsError

ON_RANK_SAMPLER = "euler"  # with a scheduler in SCHEDULE_NAMES, the whole loop runs on the ranks
CACHE_OFF = CACHE_CHOICES[0]
# The CLI's video and steps when no flag says otherwise: genmo's 848x480 (64 steps) for the real
# model, a run of seconds for the built-in demo model (random weights).
REAL_VIDEO = (848, 480, 31)  # width, height, frames
DEMO_VIDEO = (128, 96, 13)
DEMO_STEPS = 8


class SamplerPath(Enum):
    """Where the sampling loop runs."""

    ON_RANKS = "on_ranks"  # mochi.sampler's Euler loop, whole on the ranks: one round trip per step, caching
    COMFY = "comfy"  # ComfyUI's sampler code in the caller's process; every model evaluation on the ranks


@dataclass(frozen=True)
class RunChoices:
    """What a user chose for one run, before any rule applies.

    Args:
        seed, cfg, denoise: as the table declares them.
        steps: None = the model's default (DEFAULT_STEPS; DEMO_STEPS for the demo model).
        sampler_name, scheduler: ComfyUI's names (euler with a Mochi schedule runs on the ranks).
        cache: "off", "teacache" or "first_block".
        cache_threshold: None = the cache kind's default.
        cfg_schedule: one cfg per step as text ("4.5*40,1*24", `mochi.schedule.parse_cfg_schedule`);
            blank = cfg for every step.
        masked_latent: the LATENT carries a noise_mask or batch_index (ComfyUI's code handles those).
        demo: the run is on the built-in demo model.
    """

    seed: int = 0
    steps: int | None = None
    cfg: float = DEFAULT_CFG
    sampler_name: str = ON_RANK_SAMPLER
    scheduler: str = option("scheduler").default
    denoise: float = 1.0
    cache: str = CACHE_OFF
    cache_threshold: float | None = None
    cfg_schedule: str = ""
    masked_latent: bool = False
    demo: bool = False


@dataclass(frozen=True)
class RunPlan:
    """A resolved run: every value set and checked.

    Attributes:
        path: SamplerPath.ON_RANKS or SamplerPath.COMFY.
        cfg: one scale, or one per step (a parsed cfg_schedule; on-rank path only).
        cache: a mochi.step_cache.StepCacheSpec, or None for every step in full.
        notes: lines to show the user (the run goes ahead).
    """

    path: SamplerPath
    seed: int
    steps: int
    cfg: float | tuple[float, ...]
    sampler_name: str
    scheduler: str
    denoise: float
    cache: object
    notes: tuple[str, ...] = ()

    def sample_request(self, positive, negative, *, latent_shape=None, init_latent=None):
        """The on-rank path's mochi.sampler.SampleRequest (give latent_shape or init_latent)."""
        from ..mochi.sampler import SampleRequest

        return SampleRequest(positive, negative, latent_shape=latent_shape, init_latent=init_latent, seed=self.seed,
                             steps=self.steps, cfg=self.cfg, schedule=self.scheduler, denoise=self.denoise,
                             cache=self.cache)

    @property
    def uses_cfg(self) -> bool:
        return any(scale != 1.0 for scale in (self.cfg if isinstance(self.cfg, tuple) else (self.cfg,)))


def runs_on_ranks(sampler_name: str, scheduler: str, masked_latent: bool = False) -> bool:
    """Whether a run takes the on-rank path: euler with genmo's or the simple schedule, and a LATENT
    without a noise mask or batch index."""
    return sampler_name == ON_RANK_SAMPLER and scheduler in SCHEDULE_NAMES and not masked_latent


def resolve_run(choices: RunChoices) -> RunPlan:
    """Apply every rule to a run's choices; raise OptionsError naming the choice and the fix."""
    steps = choices.steps if choices.steps is not None else (DEMO_STEPS if choices.demo else DEFAULT_STEPS)
    for name, value in (("seed", choices.seed), ("steps", steps), ("cfg", choices.cfg), ("denoise", choices.denoise)):
        problem = value_problem(option(name), value)
        if problem:
            raise OptionsError(option(name).field, problem)
    for name, value in (("sampler_name", choices.sampler_name), ("scheduler", choices.scheduler)):
        if not isinstance(value, str):
            raise OptionsError(option(name).field, f"{name} must be a name, got {value!r}")
    on_ranks = runs_on_ranks(choices.sampler_name, choices.scheduler, choices.masked_latent)
    notes = ()
    if choices.cache != CACHE_OFF and not on_ranks:
        if choices.masked_latent:
            raise OptionsError(Field.CACHE, "step caching runs on the on-rank path only, and this LATENT carries a "
                                            "noise_mask or batch_index (ComfyUI's own sampler code handles those); "
                                            "set cache to off")
        raise OptionsError(Field.CACHE, f"cache={choices.cache!r} runs on the on-rank path only (sampler_name "
                                        f"{ON_RANK_SAMPLER} with scheduler {' or '.join(SCHEDULE_NAMES)}); set cache "
                                        f"to off for {choices.sampler_name} / {choices.scheduler}")
    cfg = float(choices.cfg)
    cfg_schedule = (choices.cfg_schedule or "").strip()  # blank = the cfg widget for every step
    if cfg_schedule:
        cfg = cfg_schedule_scales(cfg_schedule, steps, on_ranks, choices)
    if choices.cache == CACHE_OFF and choices.cache_threshold not in (None, option("cache_threshold").default):
        notes += (f"cache_threshold={choices.cache_threshold:g} has no effect while cache is off; choose teacache or "
                  "first_block to skip steps",)
    return RunPlan(SamplerPath.ON_RANKS if on_ranks else SamplerPath.COMFY, choices.seed, steps, cfg,
                   choices.sampler_name, choices.scheduler, float(choices.denoise),
                   resolve_cache(choices.cache, choices.cache_threshold), notes)


def cfg_schedule_scales(text: str, steps: int, on_ranks: bool, choices: RunChoices) -> tuple[float, ...]:
    """A cfg_schedule's one scale per step; OptionsError(Field.CFG_SCHEDULE) off the on-rank path, for a wrong
    count or a scale outside cfg's limits."""
    from ..mochi.schedule import parse_cfg_schedule

    if not on_ranks:
        where = ("this LATENT carries a noise_mask or batch_index (ComfyUI's own sampler code handles those)"
                 if choices.masked_latent else f"{choices.sampler_name} / {choices.scheduler} runs ComfyUI's sampler")
        raise OptionsError(Field.CFG_SCHEDULE, f"cfg_schedule runs on the on-rank path only (sampler_name {ON_RANK_SAMPLER} "
                                      f"with scheduler {' or '.join(SCHEDULE_NAMES)}) and {where}; clear cfg_schedule")
    try:
        scales = parse_cfg_schedule(text, steps)
    except ValueError as error:
        raise OptionsError(Field.CFG_SCHEDULE, f"cfg_schedule: {error}") from None
    for scale in scales:
        problem = value_problem(option("cfg"), scale)
        if problem:
            raise OptionsError(Field.CFG_SCHEDULE, f"cfg_schedule {text!r}: {problem}")
    return scales


def resolve_video(width: int | None, height: int | None, frames: int | None, demo: bool) -> tuple[int, int, int]:
    """The CLI's (width, height, frames): each given value, else the model's default."""
    defaults = DEMO_VIDEO if demo else REAL_VIDEO
    return tuple(default if value is None else value for value, default in zip((width, height, frames), defaults))


def resolve_cache(kind: str | None, threshold: float | None):
    """The step cache a run asks for: None for "off" (or no kind), else a `mochi.step_cache.StepCacheSpec`
    (threshold None: the kind's default)."""
    from ..mochi.step_cache import StepCacheKind, StepCacheSpec

    if kind in (None, "", CACHE_OFF):
        return None
    try:
        cache_kind = StepCacheKind(kind)
        return StepCacheSpec.default(cache_kind) if threshold is None else StepCacheSpec(cache_kind, threshold)
    except (ValueError, TypeError) as error:
        raise OptionsError(Field.CACHE, f"cache={kind!r}, threshold={threshold!r}: {error}") from None


def layout_note(parallel, uses_cfg: bool) -> str | None:
    """One line when the run does not suit the pool's layout (it still runs): cfg 1 on a CFG split."""
    if parallel.cfg_degree == 2 and not uses_cfg:
        return ("cfg is 1 on a pool that splits CFG (cfg_degree 2): there is no negative pass, so half the ranks idle. "
                f"A pool with cfg_degree 1 (ulysses x ring = {parallel.world_size}) would be about 2x faster "
                "for cfg-1 runs")
    return None
