"""One-shot GPU acceptance run: the full-size Mochi DiT on one GPU with nothing optional installed.

For the 10B DiT with random weights drawn on the GPU (no file; bf16, then fp8 Linear weights) it
prints:
- seconds per forward at 848x480x49, and at 848x480x163 when the planner says it fits: sampling
  steps with CFG (two forwards each) timed after one warm-up step, through the same DenoiseLoop the
  ranks run;
- achieved TFLOP/s from the planner's counted FLOPs for those steps, and the fraction of the GPU's
  dense bf16 peak (mochi/planner/hardware.py; goal >= 50 % at 49 frames in bf16);
- torch.cuda.max_memory_allocated over that sampling run beside the planner's per-rank peak for
  the same run (goal: within 10 %), and the weights' bytes beside the planner's;
- the attention kernel used (kernel.choose_backend) checked against fp32 math on a small input
  with odd lengths, and the fp8 multiply used (layers.fp8_compute) checked against the cast path;
- the tiled VAE decode of 49 frames in bf16 with the planner's default TileSpec: time, peak vs
  the planner's;
(On the CPU, as the ranks do there, the DiT and the VAE compute in fp32; the planner always counts
the GPU's bf16.)
- one step of a 1-rank Ray pool with num_gpus=1 (demo weights: it checks the pool on a GPU);
- multi-rank NCCL: one step of a 2-rank Ulysses pool when the machine has two GPUs; otherwise it
  says so and skips it (not counted);
- with two or more GPUs, a 2-rank pool step at 848x480x49 with the weights sharded (FSDP2 over the
  ranks) beside the same step replicated (demo-size DiT: it checks the gathers on NCCL and their
  cost next to a step; the full-size figures are the planner's).
It ends with ONE JSON line of these figures. A section that fails (an out-of-memory, a kernel
error) is recorded in the JSON under "error" and the run goes on (exit status 1); when the
automatic attention kernel fails its check, the DiT runs use PyTorch's flash kernel instead and
the JSON says so ("attention": {"fallback": ...}).

    python bench/gpu_acceptance.py                       # one GPU; < 8 minutes on an H200
    python bench/gpu_acceptance.py --tiny --device cpu   # the same code at demo size, in seconds
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, demo_checkpoints, random_dit, random_vae_decoder
from mochi_xdit.mochi.dit import DiTConfig
from mochi_xdit.mochi.layers import FP8, fp8_compute, quantise_fp8, scaled_mm_linear
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import (AttentionConfig, InstalledKernels, attention, attention_with_lse,
                                              choose_backend)
from mochi_xdit.mochi.planner.hardware import GB, gpu_from_device_name
from mochi_xdit.mochi.planner.simulate import count_step, count_tiled_decode
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest, default_compute_dtype, latent_shape_for_video
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.mochi.vae import VAEDecoderConfig
from mochi_xdit.mochi.vae_tiling import TileSpec, assemble_tiles, decode_tile, plan_tiles

WEIGHT_DTYPES = ("bf16", "fp8")
TEXT_TOKENS = 256  # valid tokens of the positive prompt (the planner's worst case); negative empty
CFG = 4.5
PEAK_FRACTION_GOAL = 0.50
MEMORY_RATIO_GOAL = 0.10  # measured peak within 10 % of the planner's
FIT_MARGIN = 1.15  # run a size only when 1.15 x the planner's activations fit in what is free
ATTENTION_CHECK_TOLERANCE = 2e-2  # bf16 inputs against fp32 math, outputs of magnitude ~1
FP8_INPUT_ROUNDING = 2.0**-4  # relative rounding of a float8_e4m3fn activation
BF16_ROUNDING = 2.0**-8


@dataclass(frozen=True)
class Mode:
    """What one invocation runs: the full model or the demo one, at matching video sizes."""

    dit: DiTConfig
    vae: VAEDecoderConfig
    videos: tuple[tuple[int, int, int], ...]  # (width, height, frames) for the DiT
    decode_video: tuple[int, int, int]
    tiles: TileSpec
    attention_shape: tuple[int, int, int, int]  # heads, queries, keys, head_dim for the kernel check
    linear_size: int  # K = N of the fp8 check's Linear
    repeats: int  # timed sampling steps after the warm-up


FULL = Mode(DiTConfig(), VAEDecoderConfig(), ((848, 480, 49), (848, 480, 163)), (848, 480, 49), TileSpec(),
            (8, 1000, 1077, 128), 3072, 3)
TINY = Mode(DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, ((64, 48, 7), (64, 48, 13)), (128, 96, 7),
            TileSpec(tile_height=12, tile_width=10, overlap=2, frame_chunk=1), (2, 100, 107, 48), 192, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Forget freed memory and the previous high-water mark (CUDA; nothing to do on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def ratio(measured: int | None, planned: int) -> float | None:
    return None if measured is None else measured / planned


def guarded(what: str, run, **fields) -> dict:
    """run() or, when it raises, {"error": "<type>: <first line>", **fields} (traceback on stderr)."""
    try:
        return run()
    except Exception as error:  # recorded in the JSON and the exit status, never dropped
        traceback.print_exc()
        print(f"{what}: FAILED ({type(error).__name__})", file=sys.stderr, flush=True)
        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    if torch.cuda.is_available():  # after the traceback (and the tensors its frames held) is gone
        torch.cuda.empty_cache()
    return {**fields, "error": message}


def text_conditions() -> tuple[TextCondition, TextCondition]:
    generator = torch.Generator().manual_seed(0)
    positive = TextCondition(torch.randn(1, TEXT_TOKENS, 4096, generator=generator),
                             torch.ones(1, TEXT_TOKENS, dtype=torch.int64))
    return positive, TextCondition.empty(TEXT_TOKENS)


# -- checks of the two kernel choices --------------------------------------------------------------


def attention_check(mode: Mode, device: torch.device, installed: InstalledKernels) -> dict:
    """The kernels a rank runs without and with Ring, against fp32 math on a small input (odd lengths)."""
    heads, Sq, Sk, Dh = mode.attention_shape
    dtype = default_compute_dtype(device)
    kernel = choose_backend(device.type, dtype, False, "auto", installed)
    ring_kernel = choose_backend(device.type, dtype, True, "auto", installed)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, heads, Dh, generator=generator).to(device, dtype).transpose(1, 2)
               for S in (Sq, Sk, Sk))  # [1, heads, S, Dh], stored [1, S, heads, Dh] as the model's
    scores = (q.float() @ k.float().transpose(-1, -2)) / Dh**0.5  # [1, heads, Sq, Sk] fp32 (small)
    lse = torch.logsumexp(scores, -1)  # [1, heads, Sq]
    expected = torch.softmax(scores, -1) @ v.float()  # [1, heads, Sq, Dh]
    figures = {"kernel": kernel.value, "ring_kernel": ring_kernel.value}
    try:
        out = attention(q, k, v, kernel=kernel)
        ring_out, ring_lse = attention_with_lse(q, k, v, kernel=ring_kernel)
    except RuntimeError as error:  # a kernel this GPU / build refuses: reported, the runs fall back
        return {**figures, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}", "ok": False}
    errors = {
        "max_abs_error": (out.float() - expected).abs().max().item(),
        "ring_max_abs_error": (ring_out.float() - expected).abs().max().item(),
        "ring_lse_max_abs_error": (ring_lse - lse).abs().max().item(),
    }
    return {**figures, **errors, "ok": max(errors.values()) <= ATTENTION_CHECK_TOLERANCE}


def kernels_for_runs(mode: Mode, device: torch.device, installed: InstalledKernels) -> tuple[InstalledKernels, dict]:
    """The installed kernels the DiT runs use: this machine's, when its automatic kernels pass the
    check; else PyTorch's flash / efficient kernels only (the check records the fallback)."""
    check = attention_check(mode, device, installed)
    if check["ok"]:
        return installed, check
    plain = InstalledKernels(cuda_capability=installed.cuda_capability)
    check["fallback"] = attention_check(mode, device, plain)
    return plain, check


def fp8_check(mode: Mode, device: torch.device) -> dict:
    """The fp8 multiply a rank runs, and the fp8 x fp8 product against the cast path: within fp8's
    input rounding, |y - y_cast| <= 2^-4 (|x| @ |W|^T) + bf16 rounding."""
    size = mode.linear_size
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    path = fp8_compute(device.type, capability, FP8, default_compute_dtype(device), size, size)
    generator = torch.Generator().manual_seed(1)
    weight, scale = quantise_fp8((torch.randn(size, size, generator=generator) / size**0.5).to(device))
    bias = (0.02 * torch.randn(size, generator=generator)).to(device, torch.bfloat16)
    x = torch.randn(4 * size, size, generator=generator).to(device, torch.bfloat16)
    y = scaled_mm_linear(x, weight, scale, bias).float()  # the fp8 product in bf16 (torch runs it on CPU too)
    dequantised = weight.float() * scale
    cast = torch.nn.functional.linear(x.float(), dequantised, bias.float())
    bound = FP8_INPUT_ROUNDING * (x.float().abs() @ dequantised.abs().T) + BF16_ROUNDING * cast.abs() + 1e-5
    return {"compute": path.value, "capability": capability,
            "relative_error": ((y - cast).norm() / cast.norm()).item(),
            "within_fp8_rounding": bool(((y - cast).abs() <= bound).all())}


# -- the DiT ---------------------------------------------------------------------------------------


def dit_run(model, mode: Mode, weight_dtype: str, video: tuple[int, int, int], device: torch.device,
            gpu, installed: InstalledKernels) -> dict:
    """Sampling steps with CFG through DenoiseLoop on one rank, beside the planner's count of the same."""
    width, height, frames = video
    config = mode.dit
    planned = count_step(ParallelConfig(1, num_heads=config.num_heads), width, height, frames, weight_dtype,
                         TEXT_TOKENS, True, config, installed=installed)
    figures = {"video": f"{width}x{height}x{frames}", "planned_peak_bytes": planned.peak_bytes,
               "planned_tflop_per_step": planned.total_flops / 1e12,
               "planned_attention_kernel": planned.attention_kernel.value}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if FIT_MARGIN * planned.activation_peak_bytes > available:
            figures["skipped"] = (f"the planner's {planned.activation_peak_bytes / GB:.1f} GB of activations do not "
                                  f"fit in the {available / GB:.1f} GB free")
            return figures
    positive, negative = text_conditions()
    request = SampleRequest(positive, negative, latent_shape=latent_shape_for_video(width, height, frames),
                            seed=0, steps=1 + mode.repeats, cfg=CFG)
    reset_peak(device)
    # bf16 on a GPU, fp32 on the CPU, as a rank computes
    loop = DenoiseLoop(model, request, device=device, attention=AttentionConfig(installed=installed))
    loop.begin()
    started = time.perf_counter()
    loop.step(0)  # warm-up: kernel selection, allocator growth
    synchronize(device)
    warmup = time.perf_counter() - started
    times = []
    for i in range(1, 1 + mode.repeats):
        started = time.perf_counter()
        loop.step(i)
        synchronize(device)
        times.append(time.perf_counter() - started)
    peak = peak_allocated(device)
    finite = bool(torch.isfinite(loop.latent).all())
    del loop
    step_s = statistics.median(times)
    achieved = planned.total_flops / step_s / 1e12
    figures.update({
        "seconds_per_forward": step_s / 2,  # CFG: two forwards per step
        "seconds_per_step": step_s,
        "warmup_step_seconds": warmup,
        "achieved_tflops": achieved,
        "fraction_of_bf16_peak": None if gpu is None else achieved / gpu.bf16_tflops,
        "peak_bytes": peak,
        "peak_ratio": ratio(peak, planned.peak_bytes),
        "latent_finite": finite,
    })
    return figures


def dit_figures(mode: Mode, weight_dtype: str, device: torch.device, gpu, installed: InstalledKernels) -> dict:
    """Build the DiT on the device, then run every video size of the mode."""
    from mochi_xdit.mochi.planner.simulate import weight_bytes

    reset_peak(device)
    before = allocated(device)
    started = time.perf_counter()
    model = random_dit(mode.dit, weight_dtype, device, seed=0)
    synchronize(device)
    build = time.perf_counter() - started
    measured = None if before is None else allocated(device) - before
    planned = weight_bytes(mode.dit, weight_dtype)
    figures = {"build_seconds": build, "weight_bytes": measured, "planned_weight_bytes": planned,
               "weight_ratio": ratio(measured, planned), "runs": []}
    with torch.no_grad():
        for video in mode.videos:
            label = "x".join(map(str, video))
            figures["runs"].append(guarded(f"DiT {weight_dtype} {label}", lambda: dit_run(
                model, mode, weight_dtype, video, device, gpu, installed), video=label))
    return figures  # the model is freed here; the next phase empties the cache (reset_peak)


# -- the VAE ---------------------------------------------------------------------------------------


def vae_figures(mode: Mode, device: torch.device) -> dict:
    """Tiled decode as a rank does it (`RankWorker.decode_tiles`: one tile at a time, each moved to
    the CPU, assembled there) beside the planner's count for the same TileSpec."""
    width, height, frames = mode.decode_video
    shape = latent_shape_for_video(width, height, frames)
    planned = count_tiled_decode(width, height, frames, mode.tiles, mode.vae)
    dtype = default_compute_dtype(device)  # bf16 on a GPU, fp32 on the CPU, as a rank decodes
    decoder = random_vae_decoder(mode.vae, dtype, device, seed=0)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    tiles = plan_tiles(shape, mode.tiles)
    reset_peak(device)
    started = time.perf_counter()
    with torch.no_grad():
        decoded = [(tile, decode_tile(decoder, latent, tile).cpu()) for tile in tiles]  # each [1, 3, F, 8h, 8w]
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = peak_allocated(device)
    video = assemble_tiles(tiles, decoded)  # [1, 3, 6T-5, 8H, 8W]
    del decoder, latent, decoded
    reset_peak(device)
    return {"video": f"{width}x{height}x{frames}", "tiles": len(tiles), "tile_spec": str(mode.tiles),
            "seconds": seconds, "peak_bytes": peak, "planned_peak_bytes": planned.peak_bytes,
            "peak_ratio": ratio(peak, planned.peak_bytes), "frames_out": video.shape[2],
            "finite": bool(torch.isfinite(video).all())}


# -- the Ray pool ----------------------------------------------------------------------------------


def make_pool(spec):
    """(service, pool): a MochiService of its own (Ray and the pool) and its pool for `spec`."""
    from mochi_xdit.workers.service import MochiService

    service = MochiService(log=lambda line: print(line, flush=True))
    return service, service.pool(spec)


def pool_figures(device: torch.device, world_size: int, folder: str, weights: str = "replicated",
                 latent_shape: tuple[int, ...] = (1, 12, 2, 8, 12), steps: int = 1) -> dict:
    """Start a pool of `world_size` ranks on the demo weights (placed as `weights` says), run
    `steps` sampling steps, stop it; the step figure is the last step's (the first warms up)."""
    from mochi_xdit.workers.protocol import PoolSpec

    dit_path, vae_path = demo_checkpoints(folder)
    heads = DEMO_DIT_CONFIG.num_heads
    parallel = ParallelConfig(world_size, 1, world_size, 1, num_heads=heads)  # Ulysses over the ranks
    spec = PoolSpec(str(dit_path), str(vae_path), "bf16", parallel, device=device.type, cpu_threads=1,
                    weights=weights)
    positive, negative = text_conditions()
    request = SampleRequest(positive, negative, latent_shape=latent_shape, seed=0, steps=steps, cfg=CFG)
    started = time.perf_counter()
    service, pool = make_pool(spec)
    start_s = time.perf_counter() - started
    try:
        reports = []
        started = time.perf_counter()
        latent = pool.sample(request, on_step=reports.append)
        wall = time.perf_counter() - started
        ranks = [info.node_ip for info in pool.ranks]
    finally:
        service.shutdown()  # the pool and the Ray it started
    return {"world_size": world_size, "device": device.type, "weights": weights, "start_seconds": start_s,
            "step_seconds": reports[-1].seconds, "sample_wall_seconds": wall, "ranks": len(ranks),
            "latent_finite": bool(torch.isfinite(latent).all())}


# -- main ------------------------------------------------------------------------------------------


def gpu_entry(device: torch.device):
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return gpu_from_device_name(properties.name, properties.total_memory)


def goals(figures: dict) -> dict:
    """The issue's goals, from the figures (None where this device cannot say)."""
    bf16_runs = figures["dit"]["bf16"]["runs"]
    fraction = bf16_runs[0].get("fraction_of_bf16_peak") if bf16_runs else None
    ratios = [run.get("peak_ratio") for dtype in WEIGHT_DTYPES for run in figures["dit"][dtype]["runs"]]
    ratios.append(figures["vae"].get("peak_ratio"))
    ratios = [r for r in ratios if r is not None]
    return {
        "bf16_fraction_of_peak_ge_0.5": None if fraction is None else fraction >= PEAK_FRACTION_GOAL,
        "peaks_within_10_percent": (all(abs(r - 1) <= MEMORY_RATIO_GOAL for r in ratios) if ratios else None),
        "attention_matches_math": figures["attention"]["ok"],
        "fp8_within_rounding": figures["fp8"].get("within_fp8_rounding"),
    }


def print_summary(figures: dict) -> None:
    """The figures for a reader (the JSON line after it is for tools); failed parts say so."""
    def gb(value):
        return "n/a" if value is None else f"{value / GB:.2f} GB"

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"

    def line(label: str, part: dict, text) -> None:
        print(f"{label}: FAILED {part['error']}" if "error" in part else f"{label}: {text()}")

    print(f"device: {figures['device_name']} (table: {figures['gpu_table']}, dense bf16 peak "
          f"{figures['peak_bf16_tflops']} TFLOP/s); torch {figures['torch']}; installed {figures['installed']}")
    for label, check in (("attention kernel", figures["attention"]),
                         ("attention fallback", figures["attention"].get("fallback"))):
        if check is not None:
            line(label, check, lambda c=check: (
                f"{c['kernel']} (with Ring: {c['ring_kernel']}), max error vs fp32 math {c['max_abs_error']:.2e} / "
                f"{c['ring_max_abs_error']:.2e}, lse {c['ring_lse_max_abs_error']:.2e}"))
    fp8 = figures["fp8"]
    line("fp8 weights multiply by", fp8, lambda: (
        f"{fp8['compute']} (fp8 product vs cast path: relative error {fp8['relative_error']:.3f}, within fp8 "
        f"input rounding: {fp8['within_fp8_rounding']})"))
    for dtype in WEIGHT_DTYPES:
        dit = figures["dit"][dtype]
        line(f"DiT {dtype}", dit, lambda: (f"built in {dit['build_seconds']:.1f} s, weights {gb(dit['weight_bytes'])} "
                                           f"(planner {gb(dit['planned_weight_bytes'])})"))
        for run in dit["runs"]:
            if "skipped" in run:
                print(f"  {run['video']}: skipped ({run['skipped']})")
                continue
            line(f"  {run['video']}", run, lambda r=run: (
                f"{r['seconds_per_forward']:.3f} s/forward, {r['achieved_tflops']:.1f} TFLOP/s "
                f"({pct(r['fraction_of_bf16_peak'])} of dense bf16 peak), peak {gb(r['peak_bytes'])} vs planner "
                f"{gb(r['planned_peak_bytes'])} (ratio {r['peak_ratio'] or float('nan'):.3f}), planner kernel "
                f"{r['planned_attention_kernel']}"))
    vae = figures["vae"]
    line("tiled VAE decode", vae, lambda: (
        f"{vae['video']} ({vae['tiles']} tiles, {vae['tile_spec']}): {vae['seconds']:.1f} s, peak "
        f"{gb(vae['peak_bytes'])} vs planner {gb(vae['planned_peak_bytes'])}"))
    pool = figures["pool"]
    line("1-rank pool", pool, lambda: (f"on {pool['device']}, started in {pool['start_seconds']:.1f} s, one step "
                                       f"{pool['step_seconds']:.3f} s"))
    nccl = figures["nccl"]
    if "skipped" in nccl:
        print(f"multi-rank NCCL: skipped ({nccl['skipped']})")
    else:
        line("multi-rank NCCL", nccl, lambda: f"2-rank Ulysses pool step {nccl['step_seconds']:.3f} s")
    sharded = figures.get("sharded", {})
    if "skipped" not in sharded:
        for weights, run in sharded.items():
            line(f"2-rank pool, {weights} weights, 848x480x49 (demo DiT)", run,
                 lambda run=run: f"step {run['step_seconds']:.3f} s, finite {run['latent_finite']}")
    print(f"goals: {figures['goals']}; failed: {figures['failed_sections'] or 'none'}; "
          f"total {figures['total_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="demo-size models and videos (seconds, any device)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU here; run with --tiny --device cpu for the CPU rehearsal", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    mode = TINY if args.tiny else FULL
    started = time.perf_counter()
    installed = InstalledKernels.detect()
    gpu = gpu_entry(device)
    figures = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpu_table": None if gpu is None else gpu.name,
        "peak_bf16_tflops": None if gpu is None else gpu.bf16_tflops,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "installed": {"flash_attn": installed.flash_attn, "flash_attn_3": installed.flash_attn_3,
                      "xfuser": installed.xfuser, "capability": installed.cuda_capability,
                      "cudnn": installed.cudnn_version},
    }
    print("attention and fp8 checks ...", flush=True)
    run_installed, figures["attention"] = kernels_for_runs(mode, device, installed)
    figures["fp8"] = guarded("fp8 check", lambda: fp8_check(mode, device))
    figures["dit"] = {}
    for dtype in WEIGHT_DTYPES:
        print(f"DiT {dtype} ...", flush=True)
        figures["dit"][dtype] = guarded(f"DiT {dtype}", lambda: dit_figures(mode, dtype, device, gpu, run_installed),
                                        runs=[])
    print("VAE ...", flush=True)
    figures["vae"] = guarded("VAE", lambda: vae_figures(mode, device))
    print("Ray pool ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="mochi_xdit_acceptance_") as folder:
        figures["pool"] = guarded("pool", lambda: pool_figures(device, 1, folder))
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if gpus >= 2:
            figures["nccl"] = guarded("NCCL pool", lambda: pool_figures(device, 2, folder))
            shape = latent_shape_for_video(848, 480, 49)
            figures["sharded"] = {
                weights: guarded(f"2-rank pool, {weights} weights, 848x480x49",
                                 lambda: pool_figures(device, 2, folder, weights, shape, steps=3))
                for weights in ("replicated", "sharded")
            }
        else:
            reason = (f"needs 2 or more GPUs, this machine has {gpus}" if device.type == "cuda"
                      else "NCCL runs on GPUs; this run is on the CPU")
            figures["nccl"] = figures["sharded"] = {"skipped": reason}
            print(f"multi-rank NCCL: skipped ({reason})", flush=True)
    figures["total_seconds"] = time.perf_counter() - started
    figures["goals"] = goals(figures)
    failed = failures(figures)
    figures["failed_sections"] = failed
    print_summary(figures)
    print(json.dumps(figures))
    return 1 if failed else 0


def failures(figures: dict, path: str = "") -> list[str]:
    """Where the figures hold an "error" (a failed section or run)."""
    found = []
    if isinstance(figures, dict):
        if "error" in figures:
            found.append(path or "run")
        for key, value in figures.items():
            found += failures(value, f"{path}.{key}" if path else key)
    elif isinstance(figures, list):
        for i, value in enumerate(figures):
            found += failures(value, f"{path}[{i}]")
    return found


if __name__ == "__main__":
    raise SystemExit(main())
