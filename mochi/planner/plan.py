"""Which degree mixes fit, how fast they can be, and which one to use.

For a world size, every valid (cfg, ulysses, ring) mix is counted by running our code on fake
tensors (`simulate.py`): one rank's peak memory during a sampling step and during the tiled VAE
decode, its FLOPs per step and the bytes it sends per step.

Latency model (a lower bound per step, then x steps):
    compute   = rank FLOPs / GPU peak dense bf16 throughput
    exposed   = (Ulysses all-to-all bytes + all-gather bytes) / link bandwidth
                + max(0, ring K/V bytes / link bandwidth - attention compute)
    step      = compute + exposed
The Ulysses all-to-alls and the gathers sit on the critical path (attention waits for them), so
they add; the ring posts the next K/V block before computing on the current one, so its traffic
hides behind attention compute and only the excess adds. Real runs reach about 45-55 % of peak
throughput, so expect roughly twice the bound; the bound is for comparing mixes.

A mix fits when the rank's resident weights (DiT + VAE decoder: the pool keeps both loaded) plus
the larger of the sampling and decoding activations, plus `RESERVE_GB` for the CUDA context and
allocator fragmentation, is within the GPU's memory.

Each mix is counted under each weight placement (`placement.py`): replicated (the whole DiT on
every rank), sharded (1/N of every block per rank, gathered block by block) and offload (blocks
copied from host memory as they run). The resident DiT bytes and the exposed weight traffic of the
placement replace the full DiT and add to the step. The recommendation prefers replicated when
some mix fits that way, else sharded, else offload (the same order `weights=auto` follows).
"""

import argparse
from dataclasses import dataclass

from ..constants import DEFAULT_STEPS, NUM_HEADS
from ..dit import DiTConfig
from ..parallel.config import ParallelConfig
from ..step_cache import StepCacheSpec
from ..weight_placement import WeightPlacement
from .hardware import GB, GPU, LINK_CLASSES, UNKNOWN_GPU_TFLOPS, get_gpu, gpu_with_memory, link_bandwidth
from .placement import PlacedWeights, WeightSplit, dit_calls_per_step, place, weight_split
from .simulate import (WEIGHT_DTYPES, DecodeCount, StepCount, count_step, count_tiled_decode,
                       count_tiled_encode)

RESERVE_GB = 1.0  # CUDA context (~0.5 GB) and allocator fragmentation, not counted by the tracker
NEAR_TIE = 0.05  # mixes within 5 % of the fastest bound (the model is not finer than that) rank by bytes sent
PLACEMENT_ORDER = (WeightPlacement.REPLICATED, WeightPlacement.SHARDED, WeightPlacement.OFFLOAD)  # preferred first


def placements_for(world_size: int) -> tuple[WeightPlacement, ...]:
    """The placements a world can use (sharding needs two or more ranks)."""
    return tuple(p for p in PLACEMENT_ORDER if world_size > 1 or p is not WeightPlacement.SHARDED)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def degree_mixes(world_size: int, use_cfg: bool = True, num_heads: int = NUM_HEADS) -> list[ParallelConfig]:
    """Every valid ParallelConfig for `world_size` ranks: cfg in {1, 2} (2 only with CFG and an even
    world), Ulysses dividing both the rest and the head count, Ring taking what is left."""
    mixes = []
    for cfg in (2, 1):
        if cfg == 2 and (not use_cfg or world_size % 2):
            continue
        sp = world_size // cfg
        for ulysses in sorted((d for d in _divisors(sp) if num_heads % d == 0), reverse=True):
            mixes.append(ParallelConfig(world_size, cfg, ulysses, sp // ulysses, num_heads))
    return mixes


@dataclass(frozen=True)
class MixEstimate:
    """Planner figures for one degree mix (per rank, per step unless said otherwise).

    Attributes:
        parallel: the degrees.
        step: counted sampling step (full DiT weights, activation peak, FLOPs, sent bytes).
        decode: counted tiled VAE decode (one tile at a time on the rank).
        weights: the DiT weights under the mix's placement (resident bytes, weight traffic).
        peak_bytes: resident DiT (under the placement) + VAE weights + max(sampling, decode) activations.
        fits: peak_bytes + RESERVE_GB <= GPU memory.
        compute_s, comm_s, step_s: latency bound terms (see the module docstring); comm_s includes
            the placement's exposed weight traffic.
        total_s: step_s x steps.
    """

    parallel: ParallelConfig
    step: StepCount
    decode: DecodeCount
    weights: PlacedWeights
    peak_bytes: int
    fits: bool
    compute_s: float
    comm_s: float
    step_s: float
    total_s: float

    @property
    def placement(self) -> WeightPlacement:
        return self.weights.placement

    @property
    def link_bytes(self) -> int:
        """Bytes the rank sends between ranks per step: activations, plus the weight all-gathers when sharded
        (offload's copies use the host link)."""
        gathered = self.weights.moved_bytes if self.placement is WeightPlacement.SHARDED else 0
        return self.step.total_sent + gathered

    @property
    def label(self) -> str:
        p = self.parallel
        return f"cfg{p.cfg_degree} x U{p.ulysses_degree} x R{p.ring_degree}, {self.placement.value}"


def estimate(
    parallel: ParallelConfig,
    width: int,
    height: int,
    frames: int,
    gpu: GPU,
    link_gbps: float,
    weight_dtype: str = "bf16",
    steps: int = DEFAULT_STEPS,
    use_cfg: bool = True,
    text_tokens: int = 256,
    tiles=None,
    config: DiTConfig = DiTConfig(),
    cache: StepCacheSpec | None = None,
    placement: WeightPlacement = WeightPlacement.REPLICATED,
    split: WeightSplit | None = None,
) -> MixEstimate:
    """Count one mix (cached per shape) under one weight placement and apply the latency model. With
    a step cache the memory includes the cache's residuals; the latency bound is still for every
    step computed (how many steps a cache skips depends on the run). `split` gives the DiT's stored
    bytes when they are not `weight_dtype`'s (a GGUF file: `placement.quantised_weight_split`)."""
    step = count_step(parallel, width, height, frames, weight_dtype, text_tokens, use_cfg, config, cache=cache)
    decode = count_tiled_decode(width, height, frames, tiles)
    flops_per_s = gpu.bf16_tflops * 1e12
    weights = place(split or weight_split(config, weight_dtype), placement, parallel.world_size,
                    dit_calls_per_step(parallel.cfg_degree, use_cfg), step.total_flops / flops_per_s, link_gbps)
    peak = weights.resident_bytes + decode.weight_bytes + max(step.activation_peak_bytes, decode.activation_peak_bytes)
    bytes_per_s = link_gbps * GB
    compute = step.total_flops / flops_per_s
    sent = step.sent_bytes
    blocking = (sent.get("all_to_all", 0) + sent.get("all_gather", 0)) / bytes_per_s
    ring_exposed = max(0.0, sent.get("send", 0) / bytes_per_s - step.flops.get("attention", 0) / flops_per_s)
    comm = blocking + ring_exposed + weights.exposed_s
    return MixEstimate(
        parallel=parallel,
        step=step,
        decode=decode,
        weights=weights,
        peak_bytes=peak,
        fits=peak + RESERVE_GB * GB <= gpu.memory_gb * GB,
        compute_s=compute,
        comm_s=comm,
        step_s=compute + comm,
        total_s=(compute + comm) * steps,
    )


@dataclass(frozen=True)
class Plan:
    """All mixes for one question and the recommendation.

    Attributes:
        mixes: one MixEstimate per valid degree mix.
        best: the recommended mix: among mixes that fit, the least traffic within NEAR_TIE of the
            fastest bound; the leanest in memory if none fits.
        reason: one line saying why.
    """

    mixes: tuple[MixEstimate, ...]
    best: MixEstimate
    reason: str


def plan(
    world_size: int,
    width: int = 848,
    height: int = 480,
    frames: int = 163,
    gpu: str | GPU = "H100",
    weight_dtype: str = "bf16",
    link: str | float | None = None,
    steps: int = DEFAULT_STEPS,
    use_cfg: bool = True,
    text_tokens: int = 256,
    tiles=None,
    config: DiTConfig = DiTConfig(),
    cache: StepCacheSpec | None = None,
    placements: tuple[WeightPlacement, ...] | None = None,
) -> Plan:
    """Estimate every degree mix for `world_size` ranks under every weight placement and pick one.

    Args:
        world_size: GPUs (one rank each).
        width, height, frames: video size (multiples of 16; frames = 6k + 1).
        gpu: a name from `hardware.GPUS` or a GPU.
        weight_dtype: "bf16" or "fp8" (DiT Linear weights in float8 with a per-tensor scale).
        link: "nvlink", "pcie", "ethernet" or GB/s between the ranks; None: NVLink when the GPU
            has it, else PCIe.
        steps: sampling steps.
        use_cfg: False for cfg = 1 (no unconditional pass; no CFG degree).
        text_tokens: valid tokens of the positive prompt (256 is the worst case).
        tiles: a `vae_tiling.TileSpec` for the decode (default TileSpec()).
        config: DiT size (default the 10B model; degrees follow its head count).
        cache: the run's `step_cache.StepCacheSpec` (its residuals count toward memory), or None.
        placements: the weight placements to consider; None: every one the world can use
            (`placements_for`). The first that fits in PLACEMENT_ORDER wins.

    Returns:
        Plan with the ranking and a one-line reason.
    """
    gpu = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    if link is None:
        link = "nvlink" if gpu.nvlink_gbps else "pcie"
    bandwidth = link_bandwidth(link, gpu)
    placements = placements_for(world_size) if placements is None else tuple(map(WeightPlacement.parse, placements))
    mixes = tuple(
        estimate(p, width, height, frames, gpu, bandwidth, weight_dtype, steps, use_cfg, text_tokens, tiles, config,
                 cache, placement)
        for placement in placements
        for p in degree_mixes(world_size, use_cfg, config.num_heads)
        if placement is not WeightPlacement.SHARDED or world_size > 1
    )
    best, reason = _choose(mixes, gpu, weight_dtype, link)
    return Plan(mixes, best, reason)


def _choose(mixes: tuple[MixEstimate, ...], gpu: GPU, weight_dtype: str, link) -> tuple[MixEstimate, str]:
    fitting = [m for m in mixes if m.fits]
    if not fitting:
        best = min(mixes, key=lambda m: m.peak_bytes)
        need = (best.peak_bytes / GB) + RESERVE_GB
        hint = "use fp8 weights or " if weight_dtype == "bf16" else ""
        if best.placement is WeightPlacement.REPLICATED:
            more = (f"more sequence-parallel ranks (they split activations, not the {best.step.weight_bytes / GB:.0f} "
                    "GB of DiT weights every rank holds; or weights sharded / offload)")
        else:
            more = "more sequence-parallel ranks (they split the activations)"
        return best, (
            f"nothing fits: the leanest mix {best.label} needs {need:.1f} GB per rank, a {gpu.name} has "
            f"{gpu.memory_gb:.1f} GB; {hint}{more}, or a shorter video"
        )
    placement = next(p for p in PLACEMENT_ORDER if any(m.placement is p for m in fitting))
    fitting = [m for m in fitting if m.placement is placement]
    fastest = min(m.step_s for m in fitting)
    near = [m for m in fitting if m.step_s <= fastest * (1 + NEAR_TIE)]
    # Near-ties: fewer bytes on the wire is more robust to slow links; then prefer CFG, then Ulysses.
    best = min(near, key=lambda m: (m.link_bytes, -m.parallel.cfg_degree, -m.parallel.ulysses_degree))
    why = _why(best, link)
    if best.step_s == fastest:
        speed = f"has the lowest bound, {best.step_s:.2f} s/step ({best.total_s:.0f} s total)"
    else:
        speed = (
            f"is within {NEAR_TIE:.0%} of the lowest bound ({best.step_s:.2f} vs {fastest:.2f} s/step, "
            f"{best.total_s:.0f} s total) with the least traffic ({best.link_bytes / GB:.1f} GB/step)"
        )
    return best, (
        f"{best.label}: fits ({(best.peak_bytes / GB) + RESERVE_GB:.1f} of {gpu.memory_gb:.1f} GB per rank) "
        f"and {speed}; {_placement_why(best, link)}{why}"
    )


def _placement_why(best: MixEstimate, link) -> str:
    """Why this placement: the preferred ones did not fit; what its weight traffic costs."""
    weights = best.weights
    if weights.placement is WeightPlacement.REPLICATED:
        return ""
    moved = f"{weights.moved_bytes / GB:.1f} GB/step"
    if weights.placement is WeightPlacement.SHARDED:
        return (f"the whole DiT does not fit on a rank, so each keeps 1/{best.parallel.world_size} of every block "
                f"and gathers {moved} over {link} ({weights.move_s:.2f} s, {weights.exposed_s:.2f} s not hidden); ")
    return (f"the DiT does not fit even sharded, so blocks stream from host memory: {moved} "
            f"({weights.move_s:.2f} s at the host copy rate, {weights.exposed_s:.2f} s not hidden); ")


def _why(best: MixEstimate, link) -> str:
    p = best.parallel
    if p.world_size == 1:
        return "one GPU, nothing to split"
    comm_share = best.comm_s / best.step_s if best.step_s else 0.0
    parts = []
    if p.cfg_degree == 2:
        parts.append("CFG runs the two branches on separate halves for one small all-gather per step")
    if p.ulysses_degree > 1:
        parts.append(f"Ulysses {p.ulysses_degree} splits heads with all-to-alls ({comm_share:.0%} of the step on {link})")
    if p.ring_degree > 1:
        parts.append(f"Ring {p.ring_degree} hides its K/V passing behind attention")
    return "; ".join(parts)


def recommend(
    world_size: int,
    width: int = 848,
    height: int = 480,
    frames: int = 163,
    gpu: str | GPU = "H100",
    weight_dtype: str = "bf16",
    link: str | float | None = None,
    steps: int = DEFAULT_STEPS,
    use_cfg: bool = True,
    config: DiTConfig = DiTConfig(),
    cache: StepCacheSpec | None = None,
) -> ParallelConfig:
    """The degree mix `auto` should use: the fastest that fits, preferring less traffic among
    near-ties (see `plan`).

    Args:
        world_size: GPUs (one rank each).
        width, height, frames: video size.
        gpu: GPU name ("H100", "H200", "H20", "A100-80", "A100-40", "L40", "L40S", "L20", "RTX4090").
        weight_dtype: "bf16" or "fp8".
        link: "nvlink", "pcie", "ethernet" or GB/s; None: NVLink when the GPU has it, else PCIe.
        steps: sampling steps.
        use_cfg: False when cfg is 1 at every step (no unconditional pass).
        config: DiT size (e.g. `DiTConfig.from_shapes` of the loaded checkpoint).
        cache: the run's `step_cache.StepCacheSpec`, or None.

    Returns:
        A validated ParallelConfig (even when nothing fits: the leanest mix; `plan(...)` says why).
    """
    return plan(world_size, width, height, frames, gpu, weight_dtype, link, steps, use_cfg, config=config,
                cache=cache).best.parallel


def choose_placement(
    parallel: ParallelConfig,
    width: int,
    height: int,
    frames: int,
    gpu: GPU,
    weight_dtype: str = "bf16",
    link: str | float | None = None,
    steps: int = 64,
    use_cfg: bool = True,
    config: DiTConfig = DiTConfig(),
    split: WeightSplit | None = None,
) -> tuple[WeightPlacement, str]:
    """The weight placement `auto` uses for a given mix: the first of PLACEMENT_ORDER that fits
    (with RESERVE_GB), else the leanest; and one line saying which and why. `split`: the DiT's
    stored bytes when they are not `weight_dtype`'s (a GGUF file)."""
    if link is None:
        link = "nvlink" if gpu.nvlink_gbps else "pcie"
    bandwidth = link_bandwidth(link, gpu)
    estimates = [estimate(parallel, width, height, frames, gpu, bandwidth, weight_dtype, steps, use_cfg,
                          config=config, placement=placement, split=split)
                 for placement in placements_for(parallel.world_size)]
    need = {m.placement: (m.peak_bytes / GB) + RESERVE_GB for m in estimates}
    sizes = ", ".join(f"{p.value} {gb:.1f} GB" for p, gb in need.items())
    where = f"{width}x{height}x{frames} on {parallel.world_size} x {gpu.name} ({gpu.memory_gb:.1f} GB)"
    for m in estimates:
        if m.fits:
            skipped = [p.value for p in PLACEMENT_ORDER[: PLACEMENT_ORDER.index(m.placement)] if p in need]
            why = f"{' and '.join(skipped)} would not fit" if skipped else "it fits"
            return m.placement, f"weights auto -> {m.placement.value}: {why} ({sizes} per rank for {where})"
    leanest = min(estimates, key=lambda m: m.peak_bytes)
    return leanest.placement, (f"weights auto -> {leanest.placement.value}, the leanest, though nothing fits "
                               f"({sizes} per rank for {where}); use fp8 weights, more ranks or a shorter video")


def format_table(result: Plan, title: str = "") -> str:
    """A Markdown table of every mix, best first marked with *."""
    lines = [title] if title else []
    lines.append(
        "| mix, weights | DiT weights GB | DiT peak GB | decode peak GB | rank peak GB | fits | TFLOP/step | "
        "GB sent/step | weight GB moved/step | compute s | comm s | bound s/step | bound total s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in sorted(result.mixes, key=lambda m: (not m.fits, PLACEMENT_ORDER.index(m.placement), m.step_s)):
        mark = "*" if m is result.best else ""
        dit_peak = m.weights.resident_bytes + m.step.activation_peak_bytes
        lines.append(
            f"| {mark}{m.label} | {m.weights.resident_bytes / GB:.2f} | {dit_peak / GB:.2f} | "
            f"{m.decode.peak_bytes / GB:.2f} | {m.peak_bytes / GB:.2f} | {'yes' if m.fits else 'no'} | "
            f"{m.step.total_flops / 1e12:.0f} | {m.step.total_sent / GB:.2f} | {m.weights.moved_bytes / GB:.2f} | "
            f"{m.compute_s:.2f} | {m.comm_s:.2f} | {m.step_s:.2f} | {m.total_s:.0f} |"
        )
    lines.append(f"Recommended: {result.reason}")
    return "\n".join(lines)


SUMMARY_GPUS = ("H100", "A100-40", "L40", "RTX4090")


def summary_table(
    width: int = 848,
    height: int = 480,
    frames_list: tuple[int, ...] = (49, 163),
    world_sizes: tuple[int, ...] = (1, 2, 4, 8),
    gpus: tuple[str, ...] = SUMMARY_GPUS,
    steps: int = DEFAULT_STEPS,
) -> str:
    """The README's "Will it fit?" table: per video and GPU count, the recommended mix on H100s
    over NVLink, its per-rank peak (bf16 / fp8 weights), its latency bound, and on which GPUs
    some mix fits (bf16 / fp8; the best mix per GPU may differ), all with replicated weights
    (`placement_table` has the other placements)."""
    replicated = (WeightPlacement.REPLICATED,)
    lines = [
        f"| video | GPUs | mix on H100 (NVLink) | rank peak GB bf16 / fp8 | bound, {steps} steps on H100 | "
        + " | ".join(f"fits {g} bf16 / fp8" for g in gpus) + " |",
        "|---|---|---|---|---|" + "---|" * len(gpus),
    ]
    for frames in frames_list:
        for world in world_sizes:
            best = plan(world, width, height, frames, "H100", "bf16", "nvlink", steps, placements=replicated).best
            h100 = get_gpu("H100")
            fp8 = estimate(best.parallel, width, height, frames, h100, h100.nvlink_gbps, "fp8", steps)
            fits = []
            for name in gpus:
                gpu = get_gpu(name)
                link = "nvlink" if gpu.nvlink_gbps else "pcie"
                marks = ["yes" if plan(world, width, height, frames, gpu, dtype, link, steps,
                                       placements=replicated).best.fits else "no"
                         for dtype in WEIGHT_DTYPES]
                fits.append(" / ".join(marks))
            lines.append(
                f"| {width}x{height}x{frames} | {world} | {best.label} | {best.peak_bytes / GB:.1f} / "
                f"{fp8.peak_bytes / GB:.1f} | {best.total_s:.0f} s | " + " | ".join(fits) + " |"
            )
    return "\n".join(lines)


SMALL_CARDS = ((4, "RTX4080"), (2, "RTX4090"), (1, "RTX4090"))  # 4 x 16 GB, 2 x 24 GB, 1 x 24 GB over PCIe


def placement_table(
    width: int = 848,
    height: int = 480,
    frames_list: tuple[int, ...] = (49, 163),
    cards: tuple[tuple[int, str], ...] = SMALL_CARDS,
    steps: int = 64,
) -> str:
    """The README's rows for cards smaller than the model: per video and card count, the recommended
    mix and weight placement (bf16 / fp8), its per-rank peak, the weight bytes moved per step and
    the latency bound, over PCIe."""
    lines = [
        "| video | cards | bf16: mix, weights | rank peak GB | weight GB moved/step | bound, 64 steps | "
        "fp8: mix, weights | rank peak GB | weight GB moved/step | bound, 64 steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for frames in frames_list:
        for world, name in cards:
            gpu = get_gpu(name)
            cells = []
            for dtype in WEIGHT_DTYPES:
                result = plan(world, width, height, frames, gpu, dtype, "pcie", steps)
                best = result.best
                label = best.label if best.fits else f"none fits (leanest: {best.label})"
                cells.append(f"{label} | {best.peak_bytes / GB:.1f} | {best.weights.moved_bytes / GB:.1f} | "
                             f"{best.total_s:.0f} s")
            size = f"{round(gpu.memory_gb * GB / (1024 * 2**20))} GB"
            lines.append(f"| {width}x{height}x{frames} | {world} x {size} ({gpu.name}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mochi-xdit plan",
        description="Will it fit? Count per-rank memory, FLOPs and traffic of every degree mix by running "
        "the real model code on fake tensors, and recommend one.",
    )
    parser.add_argument("--width", type=int, default=848)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, nargs="+", default=[163], help="video frames (6k+1); several allowed")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--world-size", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts to plan for")
    parser.add_argument("--gpu", default=None,
                        help="H100 (default), H200, H20, A100-80, A100-40, L40, L40S, L20, RTX4090, RTX4080")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GB per card as sold (e.g. 16, 24): the --gpu with this memory, or without --gpu a "
                        f"card of this size at {UNKNOWN_GPU_TFLOPS:g} TFLOP/s over PCIe 4")
    parser.add_argument("--weights", choices=("auto",) + tuple(p.value for p in PLACEMENT_ORDER), default="auto",
                        help="weight placement to plan for; auto: replicated if it fits, else sharded, else offload")
    parser.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="bf16")
    parser.add_argument("--link", default=None,
                        help=f"{', '.join(LINK_CLASSES)} or GB/s (default: nvlink when the GPU has it, else pcie)")
    parser.add_argument("--no-cfg", action="store_true", help="cfg = 1 (no unconditional pass)")
    parser.add_argument("--goals", action="store_true", help="also print the single-rank memory goals")
    parser.add_argument("--summary", action="store_true",
                        help="print only the compact README tables (several GPUs, bf16 and fp8; small cards)")
    return parser


def goals_report(width: int = 848, height: int = 480, frames: int = 163) -> str:
    """The memory goals of DESIGN.md section 8, counted: single-rank DiT sampling (bf16, fp8), the
    tiled decode, and the Ulysses activation scaling."""
    one = ParallelConfig(1)
    bf16 = count_step(one, width, height, frames, "bf16")
    fp8 = count_step(one, width, height, frames, "fp8")
    decode = count_tiled_decode(width, height, frames)
    encode = count_tiled_encode(width, height, frames)
    lines = [
        f"{width}x{height}x{frames}, one rank:",
        f"  DiT sampling bf16 peak {bf16.peak_bytes / GB:.2f} GB (weights {bf16.weight_bytes / GB:.2f} + "
        f"activations {bf16.activation_peak_bytes / GB:.2f}); goal <= 26 GB",
        f"  DiT sampling fp8  peak {fp8.peak_bytes / GB:.2f} GB (weights {fp8.weight_bytes / GB:.2f} + "
        f"activations {fp8.activation_peak_bytes / GB:.2f}); goal <= 16 GB",
        f"  tiled VAE decode peak {decode.peak_bytes / GB:.2f} GB (weights {decode.weight_bytes / GB:.2f} + "
        f"one tile {decode.activation_peak_bytes / GB:.2f}; {decode.spec}, {decode.tiles} tiles); goal <= 4 GB",
        f"  tiled VAE encode peak {encode.peak_bytes / GB:.2f} GB (weights {encode.weight_bytes / GB:.2f} + "
        f"one tile, all frames {encode.activation_peak_bytes / GB:.2f}; {encode.spec}, {encode.tiles} tiles)",
        f"  FLOPs per step (cond + uncond) {bf16.total_flops / 1e12:.0f} TFLOP, attention "
        f"{bf16.flops.get('attention', 0) / bf16.total_flops:.0%}",
        "  Ulysses N, activation peak per rank (cfg 1, bf16):",
    ]
    base = None
    for n in (1, 2, 4, 8):
        count = count_step(ParallelConfig(n, 1, n, 1), width, height, frames, "bf16")
        act = count.activation_peak_bytes
        base = base or act
        lines.append(f"    U={n}: {act / GB:.2f} GB = 1/{base / act:.2f} of one rank's (ideal 1/{n})")
    return "\n".join(lines)


def plan_main(argv: list[str] | None = None) -> int:
    """`mochi-xdit plan ...`: print the table for each world size and frame count."""
    args = _parser().parse_args(argv)
    for flag, values, low in (("--world-size", args.world_size, 1), ("--steps", [args.steps], 1),
                              ("--frames", args.frames, 1)):
        for value in values:
            if value < low:
                raise ValueError(f"{flag} {value}: use {low} or more")
    if args.gpu_memory is not None:
        gpu = gpu_with_memory(args.gpu_memory, get_gpu(args.gpu) if args.gpu else None)
    else:
        gpu = get_gpu(args.gpu or "H100")
    link = args.link or ("nvlink" if gpu.nvlink_gbps else "pcie")
    placements = None if args.weights == "auto" else (WeightPlacement(args.weights),)
    if args.summary:
        print(summary_table(args.width, args.height, tuple(args.frames), tuple(args.world_size), steps=args.steps))
        print()
        print(placement_table(args.width, args.height, tuple(args.frames), steps=args.steps))
        return 0
    for frames in args.frames:
        for world in args.world_size:
            if placements == (WeightPlacement.SHARDED,) and world == 1:
                print(f"\n{world} x {gpu.name}: sharded weights need two or more ranks; skipped")
                continue
            result = plan(
                world, args.width, args.height, frames, gpu, args.weight_dtype, link, args.steps,
                not args.no_cfg, placements=placements,
            )
            title = (
                f"\n{args.width}x{args.height}x{frames}, {args.steps} steps, {world} x {gpu.name} "
                f"({args.weight_dtype}, {link})"
            )
            print(format_table(result, title))
    if args.goals:
        for frames in args.frames:
            print()
            print(goals_report(args.width, args.height, frames))
    return 0


if __name__ == "__main__":
    raise SystemExit(plan_main())
