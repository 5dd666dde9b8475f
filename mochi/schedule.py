"""Noise schedules (sigma lists, 1 = pure noise, ending at 0) and per-step CFG scales.

Two schedules, named as the sampler and the nodes offer them:
- "linear_quadratic": genmo's own (`linear_quadratic_schedule`): linear in the first half of
  the steps up to a small threshold, then quadratic to full denoising.
- "simple": what ComfyUI's core KSampler does with Mochi: the flow-matching table
  sigma(t) = shift*t / (1 + (shift-1)*t), t = k/1000 (shift 6), sampled by the `simple` scheduler.
`denoise < 1` truncates a longer schedule exactly as ComfyUI's `KSampler.set_steps` does.
"""

from collections.abc import Sequence

import torch

from .constants import DEFAULT_CFG, SCHEDULE_NAMES

COMFY_FLOW_SHIFT = 6.0  # ComfyUI supported_models.GenmoMochi.sampling_settings
COMFY_FLOW_TIMESTEPS = 1000
GENMO_THRESHOLD_NOISE = 0.025
SCHEDULES = SCHEDULE_NAMES


def linear_quadratic_schedule(
    num_steps: int, threshold_noise: float = GENMO_THRESHOLD_NOISE, linear_steps: int | None = None
) -> list[float]:
    """genmo's schedule: num_steps + 1 sigmas from 1.0 down to 0.0.

    In "progress" x = 1 - sigma: x_i = i * tau / L for i < L (linear up to the threshold tau), then
    x_i = a i^2 + b i + c for L <= i < n, continuous at L and reaching 1 at n, where
    Q = n - L, a = (L - tau n) / (L Q^2), b = tau / L - 2 (L - tau n) / Q^2, c = a L^2.

    Args:
        num_steps: n >= 1.
        threshold_noise: tau, the progress reached after the linear part.
        linear_steps: L, default n // 2; needs 1 <= L < n (n = 1 is the single step 1 -> 0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: a schedule needs at least one step")
    if num_steps == 1:
        return [1.0, 0.0]  # no room for a linear part: one step from noise to clean
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 1 <= linear_steps < num_steps:
        raise ValueError(
            f"linear_steps={linear_steps} must be in [1, {num_steps - 1}] for {num_steps} steps "
            "(leave it unset for genmo's default num_steps // 2)"
        )
    L, n, tau = linear_steps, num_steps, threshold_noise
    Q = n - L
    step_diff = L - tau * n
    a = step_diff / (L * Q**2)
    b = tau / L - 2 * step_diff / Q**2
    c = a * L**2
    progress = [i * tau / L for i in range(L)] + [a * i**2 + b * i + c for i in range(L, n)] + [1.0]
    return [1.0 - x for x in progress]


def comfy_flow_sigma_table(shift: float = COMFY_FLOW_SHIFT, timesteps: int = COMFY_FLOW_TIMESTEPS) -> torch.Tensor:
    """ComfyUI `ModelSamplingDiscreteFlow.sigmas` for Mochi (multiplier 1): sigma(k / timesteps) for
    k = 1..timesteps, ascending, float32 as ComfyUI computes it."""
    t = torch.arange(1, timesteps + 1, 1) / timesteps  # [timesteps] float32
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def comfy_simple_schedule(steps: int, shift: float = COMFY_FLOW_SHIFT) -> list[float]:
    """ComfyUI's `simple` scheduler on the flow table: `steps` entries evenly spaced from the top of
    the table (index -(1 + int(x * len / steps))), then 0.0. Returns steps + 1 floats."""
    if steps < 1:
        raise ValueError(f"steps={steps}: a schedule needs at least one step")
    table = comfy_flow_sigma_table(shift)
    stride = len(table) / steps
    return [float(table[-(1 + int(x * stride))]) for x in range(steps)] + [0.0]


def sigma_schedule(name: str, steps: int, denoise: float = 1.0) -> list[float]:
    """The sigmas a run of `steps` Euler steps visits: steps + 1 floats, descending, ending at 0.

    denoise < 1 follows ComfyUI's KSampler.set_steps: build the schedule for int(steps / denoise)
    steps and keep its last steps + 1 sigmas, so the run starts part-way down (img2img).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise={denoise} must be in (0, 1]; 1 starts from pure noise")
    build = linear_quadratic_schedule if name == "linear_quadratic" else comfy_simple_schedule
    if denoise > 0.9999:  # ComfyUI's threshold
        return build(steps)
    return build(int(steps / denoise))[-(steps + 1):]


def cfg_schedule(cfg: float | Sequence[float], steps: int) -> list[float]:
    """One CFG scale per step: a float is repeated; a list must have exactly `steps` entries."""
    if isinstance(cfg, (int, float)):
        scales = [float(cfg)] * steps
    else:
        scales = [float(value) for value in cfg]
        if len(scales) != steps:
            raise ValueError(f"the cfg list has {len(scales)} entries but there are {steps} steps; give one per step")
    for value in scales:
        if not value >= 0.0:  # also rejects NaN
            raise ValueError(f"cfg={value} must be >= 0 (1 disables guidance, Mochi's default is {DEFAULT_CFG})")
    return scales


def parse_cfg_schedule(text: str, steps: int) -> tuple[float, ...]:
    """genmo's / kijai's per-step CFG as text -> one scale per step (the only parser of this format).

    Comma-separated entries, each a scale or `scale*count` (that scale for `count` steps), e.g.
    "4.5*40,1*24" (64 steps: 4.5 for 40, then 1 for 24, the unconditional pass skipped) or
    "6, 5.5, 5, 4.5"; whitespace is ignored. The entries must cover exactly `steps` steps.

    Raises ValueError naming the bad entry, or the count against `steps` with the fix.
    """
    scales: list[float] = []
    entries = [entry.strip() for entry in str(text).split(",")]
    if not any(entries):
        raise ValueError('the cfg schedule is empty; give e.g. "4.5*40,1*24" (scale*steps, comma-separated)')
    for entry in entries:
        scale_text, star, count_text = entry.partition("*")
        try:
            scale = float(scale_text)
            count = int(count_text) if star else 1
        except ValueError:
            raise ValueError(
                f'cfg schedule entry {entry!r} is not "scale" or "scale*steps" (e.g. "4.5*40,1*24")'
            ) from None
        if count < 1:
            raise ValueError(f"cfg schedule entry {entry!r}: the step count must be >= 1")
        scales += [scale] * count
    if len(scales) != steps:
        raise ValueError(
            f"the cfg schedule {text!r} covers {len(scales)} steps but steps={steps}; make the counts add up to "
            f"{steps} (with denoise < 1, steps is the number of steps that run)"
        )
    return tuple(cfg_schedule(scales, steps))
