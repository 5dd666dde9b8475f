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
  says so and skips it (not counted).
It ends with ONE JSON line of these figures.

    python bench/gpu_acceptance.py                       # one GPU; < 8 minutes on an H200
    python bench/gpu_acceptance.py --tiny --device cpu   # the same code at demo size, in seconds
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, demo_checkpoints, random_dit, random_vae_decoder
from mochi_xdit.mochi.dit import DiTConfig
from mochi_xdit.mochi.layers import FP8, fp8_compute, quantise_fp8, scaled_mm_linear
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import InstalledKernels, attention, attention_with_lse, choose_backend
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
    out = attention(q, k, v, kernel=kernel)
    ring_out, ring_lse = attention_with_lse(q, k, v, kernel=ring_kernel)
    errors = {
        "max_abs_error": (out.float() - expected).abs().max().item(),
        "ring_max_abs_error": (ring_out.float() - expected).abs().max().item(),
        "ring_lse_max_abs_error": (ring_lse - lse).abs().max().item(),
    }
    return {"kernel": kernel.value, "ring_kernel": ring_kernel.value, **errors,
            "ok": max(errors.values()) <= ATTENTION_CHECK_TOLERANCE}


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
            gpu) -> dict:
    """Sampling steps with CFG through DenoiseLoop on one rank, beside the planner's count of the same."""
    width, height, frames = video
    config = mode.dit
    planned = count_step(ParallelConfig(1, num_heads=config.num_heads), width, height, frames, weight_dtype,
                         TEXT_TOKENS, True, config)
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
    loop = DenoiseLoop(model, request, device=device)  # bf16 on a GPU, fp32 on the CPU, as a rank computes
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


def dit_figures(mode: Mode, weight_dtype: str, device: torch.device, gpu) -> dict:
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
            figures["runs"].append(dit_run(model, mode, weight_dtype, video, device, gpu))
    del model
    reset_peak(device)
    return figures


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
    """The pool's construction, in one place (the driver-side API may be renamed)."""
    from mochi_xdit.workers.pool import Pool

    return Pool(spec)


def pool_figures(device: torch.device, world_size: int, folder: str) -> dict:
    """Start a pool of `world_size` ranks on the demo weights, run one sampling step, stop it."""
    from mochi_xdit.workers.protocol import PoolSpec

    dit_path, vae_path = demo_checkpoints(folder)
    heads = DEMO_DIT_CONFIG.num_heads
    parallel = ParallelConfig(world_size, 1, world_size, 1, num_heads=heads)  # Ulysses over the ranks
    spec = PoolSpec(str(dit_path), str(vae_path), "bf16", parallel, device=device.type, cpu_threads=1)
    positive, negative = text_conditions()
    request = SampleRequest(positive, negative, latent_shape=(1, 12, 2, 8, 12), seed=0, steps=1, cfg=CFG)
    started = time.perf_counter()
    pool = make_pool(spec)
    start_s = time.perf_counter() - started
    try:
        reports = []
        started = time.perf_counter()
        latent = pool.sample(request, on_step=reports.append)
        wall = time.perf_counter() - started
        ranks = [info.node_ip for info in pool.ranks]
    finally:
        pool.shutdown()
    return {"world_size": world_size, "device": device.type, "start_seconds": start_s,
            "step_seconds": reports[0].seconds, "sample_wall_seconds": wall, "ranks": len(ranks),
            "latent_finite": bool(torch.isfinite(latent).all())}


# -- main ------------------------------------------------------------------------------------------


def gpu_entry(device: torch.device):
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return gpu_from_device_name(properties.name, properties.total_memory)


def goals(figures: dict) -> dict:
    """The issue's goals, from the figures (None where this device cannot say)."""
    bf16_first = figures["dit"]["bf16"]["runs"][0]
    fraction = bf16_first.get("fraction_of_bf16_peak")
    ratios = [run.get("peak_ratio") for dtype in WEIGHT_DTYPES for run in figures["dit"][dtype]["runs"]]
    ratios.append(figures["vae"]["peak_ratio"])
    ratios = [r for r in ratios if r is not None]
    return {
        "bf16_fraction_of_peak_ge_0.5": None if fraction is None else fraction >= PEAK_FRACTION_GOAL,
        "peaks_within_10_percent": (all(abs(r - 1) <= MEMORY_RATIO_GOAL for r in ratios) if ratios else None),
        "attention_matches_math": figures["attention"]["ok"],
        "fp8_within_rounding": figures["fp8"]["within_fp8_rounding"],
    }


def print_summary(figures: dict) -> None:
    def gb(value):
        return "n/a" if value is None else f"{value / GB:.2f} GB"

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"

    print(f"device: {figures['device_name']} (table: {figures['gpu_table']}, dense bf16 peak "
          f"{figures['peak_bf16_tflops']} TFLOP/s); torch {figures['torch']}")
    attention_figures = figures["attention"]
    print(f"attention kernel: {attention_figures['kernel']} (with Ring: {attention_figures['ring_kernel']}), "
          f"max error vs fp32 math {attention_figures['max_abs_error']:.2e} / {attention_figures['ring_max_abs_error']:.2e}")
    print(f"fp8 weights multiply by: {figures['fp8']['compute']} (fp8 product vs cast path: relative error "
          f"{figures['fp8']['relative_error']:.3f}, within fp8 input rounding: {figures['fp8']['within_fp8_rounding']})")
    for dtype in WEIGHT_DTYPES:
        dit = figures["dit"][dtype]
        print(f"DiT {dtype}: built in {dit['build_seconds']:.1f} s, weights {gb(dit['weight_bytes'])} "
              f"(planner {gb(dit['planned_weight_bytes'])})")
        for run in dit["runs"]:
            if "skipped" in run:
                print(f"  {run['video']}: skipped ({run['skipped']})")
                continue
            print(f"  {run['video']}: {run['seconds_per_forward']:.3f} s/forward, {run['achieved_tflops']:.0f} "
                  f"TFLOP/s ({pct(run['fraction_of_bf16_peak'])} of dense bf16 peak), peak {gb(run['peak_bytes'])} "
                  f"vs planner {gb(run['planned_peak_bytes'])} (ratio {run['peak_ratio'] or float('nan'):.3f}), "
                  f"planner kernel {run['planned_attention_kernel']}")
    vae = figures["vae"]
    print(f"tiled VAE decode {vae['video']} ({vae['tiles']} tiles, {vae['tile_spec']}): {vae['seconds']:.1f} s, "
          f"peak {gb(vae['peak_bytes'])} vs planner {gb(vae['planned_peak_bytes'])}")
    pool = figures["pool"]
    print(f"1-rank pool on {pool['device']}: started in {pool['start_seconds']:.1f} s, one step {pool['step_seconds']:.3f} s")
    nccl = figures["nccl"]
    print(f"multi-rank NCCL: {nccl['skipped']}" if "skipped" in nccl else
          f"multi-rank NCCL: 2-rank Ulysses pool step {nccl['step_seconds']:.3f} s")
    print(f"goals: {figures['goals']}; total {figures['total_seconds']:.0f} s")


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
    figures["attention"] = attention_check(mode, device, installed)
    figures["fp8"] = fp8_check(mode, device)
    figures["dit"] = {}
    for dtype in WEIGHT_DTYPES:
        print(f"DiT {dtype} ...", flush=True)
        figures["dit"][dtype] = dit_figures(mode, dtype, device, gpu)
    print("VAE ...", flush=True)
    figures["vae"] = vae_figures(mode, device)
    print("Ray pool ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="mochi_xdit_acceptance_") as folder:
        try:
            figures["pool"] = pool_figures(device, 1, folder)
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            if gpus >= 2:
                figures["nccl"] = pool_figures(device, 2, folder)
            else:
                reason = (f"needs 2 or more GPUs, this machine has {gpus}" if device.type == "cuda"
                          else "NCCL runs on GPUs; this run is on the CPU")
                figures["nccl"] = {"skipped": reason}
                print(f"multi-rank NCCL: skipped ({reason})", flush=True)
        finally:
            from mochi_xdit.workers.ray_runtime import shutdown_ray

            shutdown_ray()
    figures["total_seconds"] = time.perf_counter() - started
    figures["goals"] = goals(figures)
    print_summary(figures)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
