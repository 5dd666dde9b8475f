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
- the cuDNN version; fp8 with and without `_scaled_mm`'s fast accumulation (error and TFLOP/s), and
  the accumulation a pool keeps there (`fp8_accumulation.choose_fp8_accumulation`: "pool_choice");
- conv3d at the VAE's costliest shape with channels_last_3d and cuDNN's autotuner on and off, and
  the setting a rank keeps (`mochi/vae_conv.py`);
- one Ulysses block's all-to-alls between two ranks at the largest video (NCCL on two GPUs, with the
  transport NCCL chose from its NCCL_DEBUG=INFO lines: P2P/NVLink or not; gloo on the CPU rehearsal);
- with two or more GPUs: a few steps of U2, CFG2 and (with four) U2xR2 NCCL pools;
- every attention kernel's measured TFLOP/s at the real 848x480x49 shape, without and with the
  log-sum-exp, and the one a pool keeps (`kernel_choice.KernelChoice`); the bf16 forward without and
  with `DiTCompile.ON` (first compiled forward, steady seconds, speedup; on a GPU only: Inductor's
  CPU build takes minutes, `bench/compile_speedup.py` measures it);
- with two or more GPUs, 2-rank pool steps at 848x480x49 with the weights sharded (FSDP2 over the
  ranks) beside the same steps replicated (demo-size DiT: it checks the gathers on NCCL and their
  cost next to a step; the full-size figures are the planner's).
The run is a list of sections (`SECTIONS`: key, estimated seconds on one H200, function); adding
one is one `Section(...)` line. Each section is guarded and timed: one that fails (an
out-of-memory, a kernel error of any type) is recorded in the JSON under "error" and the run goes
on (exit status 1); the JSON line always prints, with each section's measured and estimated
seconds. When the automatic attention kernel fails its check, the DiT runs use PyTorch's flash
kernel instead and the JSON says so ("attention": {"fallback": ...}). `--sections a,b` runs some.

    python bench/gpu_acceptance.py                       # one GPU; < 8 minutes on an H200
    python bench/gpu_acceptance.py --tiny --device cpu   # the same code at demo size, in seconds
"""

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, demo_checkpoints, random_dit, random_vae_decoder
from mochi_xdit.mochi.dit import DiTConfig
from mochi_xdit.mochi.fp8_accumulation import choose_fp8_accumulation
from mochi_xdit.mochi.layers import FP8, fp8_compute, quantise_fp8, scaled_mm_linear, within_fp8_rounding
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import (AttentionConfig, InstalledKernels, attention, attention_with_lse,
                                              choose_backend)
from mochi_xdit.mochi.parallel.kernel_choice import KernelChoice
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
FP8_TIMED_CALLS = 10
NCCL_TRANSPORT_WORDS = ("via P2P", "P2P/", "NVLS", "via SHM", "via NET")  # NCCL_DEBUG=INFO channel lines


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
    except Exception as error:  # a kernel this GPU / build refuses (an older FA3 raises TypeError): the runs fall back
        return {**figures, "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}", "ok": False}
    errors = {
        "max_abs_error": (out.float() - expected).abs().max().item(),
        "ring_max_abs_error": (ring_out.float() - expected).abs().max().item(),
        "ring_lse_max_abs_error": (ring_lse - lse).abs().max().item(),
    }
    return {**figures, **errors, "ok": max(errors.values()) <= ATTENTION_CHECK_TOLERANCE}


def fp8_check(mode: Mode, device: torch.device) -> dict:
    """The fp8 multiply a rank runs, and the fp8 x fp8 product against the cast path, without and
    with `_scaled_mm`'s fast accumulation: within fp8's input rounding (`layers.within_fp8_rounding`:
    |y - y_cast| <= 2^-4 (|x| @ |W|^T) + bf16 rounding); each one's time; and what a pool keeps
    (`fp8_accumulation.choose_fp8_accumulation` on one fp8 block of this size, "pool_choice")."""
    size = mode.linear_size
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    path = fp8_compute(device.type, capability, FP8, default_compute_dtype(device), size, size)
    generator = torch.Generator().manual_seed(1)
    weight, scale = quantise_fp8((torch.randn(size, size, generator=generator) / size**0.5).to(device))
    bias = (0.02 * torch.randn(size, generator=generator)).to(device, torch.bfloat16)
    x = torch.randn(4 * size, size, generator=generator).to(device, torch.bfloat16)
    dequantised = weight.float() * scale
    cast = torch.nn.functional.linear(x.float(), dequantised, bias.float())
    figures = {"compute": path.value, "capability": capability}
    for label, fast in (("", False), ("fast_accumulation_", True)):
        y = scaled_mm_linear(x, weight, scale, bias, fast).float()  # the fp8 product in bf16 (CPU torch runs it too)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(FP8_TIMED_CALLS):
            scaled_mm_linear(x, weight, scale, bias, fast)
        synchronize(device)
        seconds = (time.perf_counter() - started) / FP8_TIMED_CALLS
        figures.update({f"{label}relative_error": ((y - cast).norm() / cast.norm()).item(),
                        f"{label}within_fp8_rounding": within_fp8_rounding(y, cast, x, dequantised),
                        f"{label}tflops": 2 * x.shape[0] * size * size / seconds / 1e12})
    figures["pool_choice"] = guarded("fp8 pool choice", lambda: fp8_pool_choice(mode, device))
    return figures


def fp8_pool_choice(mode: Mode, device: torch.device) -> dict:
    """What a pool's ranks keep on this device: `choose_fp8_accumulation` on a one-block fp8 DiT of
    the mode's size (random weights), as `workers/actor.py` runs it at load."""
    model = random_dit(dataclasses.replace(mode.dit, depth=1), "fp8", device, seed=2)
    choice = choose_fp8_accumulation(model, device, default_compute_dtype(device))
    del model
    return {"fast_accumulation": choice.fast, "relative_errors": choice.relative_errors, "note": choice.note}


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
    loop = DenoiseLoop(model, request, device=device,
                       attention=KernelChoice(AttentionConfig(installed=installed), measure=True))
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


def vae_conv_figures(mode: Mode, device: torch.device) -> dict:
    """conv3d at the decoder's costliest shape (finest width, output resolution of one tile) with
    channels_last_3d and cuDNN's autotuner on and off; the setting a rank keeps (`mochi.vae_conv`:
    measured on a GPU at load, the default elsewhere)."""
    from mochi_xdit.mochi.vae_conv import ALL_CONV_SETTINGS, decoder_conv_shape, fastest, time_conv3d

    shape = decoder_conv_shape(mode.vae, mode.tiles.tile_height, mode.tiles.tile_width, mode.tiles.frame_chunk)
    dtype = default_compute_dtype(device)
    timings = {settings: time_conv3d(settings, shape, dtype, device) for settings in ALL_CONV_SETTINGS}
    chosen = fastest(timings) if device.type == "cuda" else ALL_CONV_SETTINGS[0]  # the CPU keeps the default

    def label(settings) -> str:
        return f"channels_last={settings.channels_last},cudnn_benchmark={settings.cudnn_benchmark}"

    return {"shape": list(shape), "seconds": {label(k): v for k, v in timings.items()}, "rank_keeps": label(chosen),
            "speedup_vs_default": timings[ALL_CONV_SETTINGS[0]] / timings[chosen]}


# -- the Ray pool ----------------------------------------------------------------------------------


def make_pool(spec):
    """(service, pool): a MochiService of its own (Ray and the pool) and its pool for `spec`."""
    from mochi_xdit.workers.service import MochiService

    service = MochiService(log=lambda line: print(line, flush=True))
    return service, service.pool(spec)


def pool_figures(device: torch.device, parallel: ParallelConfig, folder: str, steps: int = 1,
                 weights: str = "replicated", latent_shape: tuple[int, ...] = (1, 12, 2, 8, 12)) -> dict:
    """Start a pool of these degrees on the demo weights (placed as `weights` says), run `steps`
    sampling steps, stop it."""
    from mochi_xdit.workers.protocol import PoolSpec

    dit_path, vae_path = demo_checkpoints(folder)
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
    return {"world_size": parallel.world_size, "degrees": f"cfg{parallel.cfg_degree} x U{parallel.ulysses_degree} x "
            f"R{parallel.ring_degree}", "device": device.type, "weights": weights, "start_seconds": start_s,
            "step_seconds": statistics.median(r.seconds for r in reports), "sample_wall_seconds": wall,
            "ranks": len(ranks), "latent_finite": bool(torch.isfinite(latent).all())}


MULTI_GPU_LAYOUTS = (("U2", 1, 2, 1), ("CFG2", 2, 1, 1), ("U2xR2", 1, 2, 2))  # name, cfg, ulysses, ring


def multi_gpu_figures(device: torch.device, gpus: int, folder: str) -> dict:
    """A few sampling steps of an NCCL pool per layout that fits this machine's GPUs."""
    heads = DEMO_DIT_CONFIG.num_heads
    figures = {}
    for name, cfg, ulysses, ring in MULTI_GPU_LAYOUTS:
        world = cfg * ulysses * ring
        if world > gpus:
            figures[name] = {"skipped": f"needs {world} GPUs, this machine has {gpus}"}
            continue
        parallel = ParallelConfig(world, cfg, ulysses, ring, num_heads=heads)
        figures[name] = guarded(f"{name} pool", lambda: pool_figures(device, parallel, folder, steps=3))
    return figures


def sharded_figures(device: torch.device, folder: str) -> dict:
    """A few steps of a 2-rank Ulysses pool at 848x480x49, weights replicated and sharded (each
    guarded on its own, so one failing still reports the other)."""
    parallel = ParallelConfig(2, 1, 2, 1, num_heads=DEMO_DIT_CONFIG.num_heads)
    shape = latent_shape_for_video(848, 480, 49)
    return {weights: guarded(f"2-rank pool, {weights} weights, 848x480x49",
                             lambda weights=weights: pool_figures(device, parallel, folder, steps=3, weights=weights,
                                                                  latent_shape=shape))
            for weights in ("replicated", "sharded")}


# -- collectives: all-to-all per block, NCCL's transport -------------------------------------------


def ulysses_block_bytes(mode: Mode, world: int) -> tuple[int, int]:
    """Elements one rank sends into one block's Ulysses exchanges at the mode's largest video:
    (q, k, v in, attention output back), for `world` Ulysses ranks."""
    width, height, frames = mode.videos[-1]
    _, _, T, H, W = latent_shape_for_video(width, height, frames)
    tokens = T * (H // 2) * (W // 2)
    shard = -(-tokens // world)
    inner = mode.dit.num_heads * mode.dit.head_dim
    return 3 * shard * inner, shard * inner


def _collective_rank(rank: int, world: int, backend: str, store_path: str, elements: tuple[int, int],
                     repeats: int, result_path: str) -> None:
    """One rank of `collective_figures` (a spawned process)."""
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    dtype = default_compute_dtype(device)
    buffers = [torch.randn(n // world * world, device=device).to(dtype) for n in elements]  # [U * chunk]
    outputs = [torch.empty_like(b) for b in buffers]
    times = []
    for i in range(1 + repeats):  # the first round warms up (NCCL connects lazily per peer)
        synchronize(device)
        dist.barrier()
        started = time.perf_counter()
        for buffer, output in zip(buffers, outputs):
            dist.all_to_all_single(output, buffer)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - started)
    dist.destroy_process_group()
    torch.save({"seconds": statistics.median(times), "bytes": sum(b.numel() * b.element_size() for b in buffers)},
               result_path)


def collective_figures(mode: Mode, device: torch.device, folder: str) -> dict:
    """Two ranks (NCCL on two GPUs; gloo on the CPU at demo size) time one block's Ulysses all-to-alls
    at the mode's largest video, and on NCCL report which transport NCCL chose (NCCL_DEBUG=INFO)."""
    import glob
    import os

    import torch.multiprocessing as mp

    world, backend = 2, ("nccl" if device.type == "cuda" else "gloo")
    elements = ulysses_block_bytes(mode, world)
    log_pattern = os.path.join(folder, "nccl_debug.%p.log")
    os.environ.update({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,P2P,NET", "NCCL_DEBUG_FILE": log_pattern})
    store_path = os.path.join(folder, "collectives_store")
    results = [os.path.join(folder, f"collectives_rank{r}.pt") for r in range(world)]
    spawn = mp.get_context("spawn")
    ranks = [spawn.Process(target=_collective_rank, args=(r, world, backend, store_path, elements, 3, results[r]))
             for r in range(world)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(300)
        if rank.is_alive():
            rank.kill()
    for name in ("NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE"):
        os.environ.pop(name, None)
    if not all(os.path.exists(path) for path in results):
        raise RuntimeError(f"a collective rank failed (exit codes {[rank.exitcode for rank in ranks]})")
    measured = [torch.load(path) for path in results]
    seconds = max(m["seconds"] for m in measured)
    lines = []
    for path in glob.glob(os.path.join(folder, "nccl_debug.*.log")):
        with open(path, errors="replace") as log:
            lines += [line.strip() for line in log if any(word in line for word in NCCL_TRANSPORT_WORDS)]
    return {"backend": backend, "ranks": world, "video": "x".join(map(str, mode.videos[-1])),
            "bytes_per_rank_per_block": measured[0]["bytes"], "all_to_all_ms_per_block": seconds * 1e3,
            "gb_per_s_per_rank": measured[0]["bytes"] / seconds / 1e9,
            "nccl_p2p_or_nvlink": (any("P2P" in line or "NVLS" in line for line in lines) if backend == "nccl"
                                   else None),
            "nccl_transport_lines": lines[:6]}


# -- sections: each a guarded, timed part of the run -----------------------------------------------


class Run:
    """What the sections share: the mode, the device, what is installed, a scratch folder, and the
    figures gathered so far (later sections read earlier ones, e.g. the attention fallback)."""

    def __init__(self, mode: Mode, device: torch.device, installed: InstalledKernels, folder: str):
        self.mode, self.device, self.installed, self.folder = mode, device, installed, folder
        self.gpu = gpu_entry(device)
        self.gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        self.figures: dict = {}

    @property
    def run_installed(self) -> InstalledKernels:
        """The installed kernels the DiT runs use: this machine's when its automatic kernels passed
        the attention check, else PyTorch's flash / efficient kernels only."""
        check = self.figures.get("attention", {})
        if check.get("ok"):
            return self.installed
        return InstalledKernels(cuda_capability=self.installed.cuda_capability)


@dataclass(frozen=True)
class Section:
    """One part of the acceptance run.

    Args:
        key: where its figures go in the JSON (("dit", "bf16") nests).
        estimate_s: expected seconds on one H200 (full size), printed beside the measured ones.
        run: makes the figures (a dict); an exception becomes {"error": ...} and the run goes on.
        skip: says why it does not apply here (None: it runs).
    """

    key: tuple[str, ...]
    estimate_s: float
    run: Callable[[Run], dict]
    skip: Callable[[Run], str | None] = lambda run: None


def _attention_section(run: Run) -> dict:
    check = attention_check(run.mode, run.device, run.installed)
    if not check["ok"]:
        check["fallback"] = attention_check(run.mode, run.device, InstalledKernels(
            cuda_capability=run.installed.cuda_capability))
    return check


def _needs_gpus(count: int):
    def skip(run: Run) -> str | None:
        if run.device.type != "cuda":
            return "NCCL runs on GPUs; this run is on the CPU"
        return None if run.gpus >= count else f"needs {count} or more GPUs, this machine has {run.gpus}"
    return skip


SECTIONS = (
    Section(("attention",), 5, _attention_section),
    Section(("fp8",), 5, lambda run: fp8_check(run.mode, run.device)),
    *(Section(("dit", dtype), 75, lambda run, dtype=dtype: dit_figures(run.mode, dtype, run.device, run.gpu,
                                                                        run.run_installed))
      for dtype in WEIGHT_DTYPES),
    Section(("vae",), 40, lambda run: vae_figures(run.mode, run.device)),
    Section(("vae_conv",), 15, lambda run: vae_conv_figures(run.mode, run.device)),
    Section(("pool",), 45, lambda run: pool_figures(run.device, ParallelConfig(1, num_heads=DEMO_DIT_CONFIG.num_heads),
                                                    run.folder)),
    Section(("collectives",), 30, lambda run: collective_figures(run.mode, run.device, run.folder),
            skip=lambda run: None if run.device.type == "cpu" else _needs_gpus(2)(run)),
    Section(("multi_gpu",), 150, lambda run: multi_gpu_figures(run.device, run.gpus, run.folder), skip=_needs_gpus(2)),
    Section(("kernel_choice",), 20, lambda run: kernel_choice_figures(run.mode, run.device, run.run_installed)),
    Section(("compile",), 240, lambda run: compile_figures(run.mode, run.device),
            skip=lambda run: None if run.device.type == "cuda" else
            "compile is measured on a GPU here; on the CPU run bench/compile_speedup.py"),
    Section(("sharded",), 90, lambda run: sharded_figures(run.device, run.folder), skip=_needs_gpus(2)),
)


def run_sections(sections, run: Run) -> dict:
    """Run every section in order, each guarded (any Exception is recorded, never raised) and timed;
    returns run.figures."""
    for section in sections:
        label = ".".join(section.key)
        reason = section.skip(run)
        if reason is not None:
            part = {"skipped": reason}
            print(f"{label}: skipped ({reason})", flush=True)
        else:
            print(f"{label} ... (estimate {section.estimate_s:g} s on one H200)", flush=True)
            started = time.perf_counter()
            part = guarded(label, lambda: section.run(run))
            part["section_seconds"] = time.perf_counter() - started
        part["estimate_s"] = section.estimate_s
        place = run.figures
        for key in section.key[:-1]:
            place = place.setdefault(key, {})
        place[section.key[-1]] = part
    return run.figures


# -- main ------------------------------------------------------------------------------------------


def gpu_entry(device: torch.device):
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return gpu_from_device_name(properties.name, properties.total_memory)


def goals(figures: dict) -> dict:
    """The issue's goals, from the figures (None where this device cannot say)."""
    dit = figures.get("dit", {})
    bf16_runs = dit.get("bf16", {}).get("runs", [])
    fraction = bf16_runs[0].get("fraction_of_bf16_peak") if bf16_runs else None
    ratios = [run.get("peak_ratio") for dtype in WEIGHT_DTYPES for run in dit.get(dtype, {}).get("runs", [])]
    ratios.append(figures.get("vae", {}).get("peak_ratio"))
    ratios = [r for r in ratios if r is not None]
    fp8 = figures.get("fp8", {})
    return {
        "bf16_fraction_of_peak_ge_0.5": None if fraction is None else fraction >= PEAK_FRACTION_GOAL,
        "peaks_within_10_percent": (all(abs(r - 1) <= MEMORY_RATIO_GOAL for r in ratios) if ratios else None),
        "attention_matches_math": figures.get("attention", {}).get("ok"),
        "fp8_within_rounding": fp8.get("within_fp8_rounding"),
        "fp8_fast_accumulation_within_rounding": fp8.get("fast_accumulation_within_fp8_rounding"),
    }


def print_summary(figures: dict) -> None:
    """The figures for a reader (the JSON line after it is for tools); failed parts say so."""
    def gb(value):
        return "n/a" if value is None else f"{value / GB:.2f} GB"

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"

    def line(label: str, part: dict, text) -> None:
        if "skipped" in part:
            print(f"{label}: skipped ({part['skipped']})")
        elif "error" in part:
            print(f"{label}: FAILED {part['error']}")
        else:
            try:
                print(f"{label}: {text()}")
            except (KeyError, TypeError, ValueError) as error:  # a partial section: say so, keep printing
                print(f"{label}: incomplete figures ({type(error).__name__}: {error})")

    def part(*keys) -> dict:
        found = figures
        for key in keys:
            found = found.get(key) or {}
        return found or {"skipped": "not run (--sections)"}

    def lines_per_run(label: str, section: dict, run_label, text) -> None:
        """One line per run of a section of several runs (or one saying it was skipped or failed)."""
        if "skipped" in section or "error" in section:
            line(label, section, lambda: "")
            return
        for name, run in section.items():
            if isinstance(run, dict):
                line(run_label(name), run, lambda r=run: text(r))

    print(f"device: {figures.get('device_name')} (table: {figures.get('gpu_table')}, dense bf16 peak "
          f"{figures.get('peak_bf16_tflops')} TFLOP/s); torch {figures['torch']}, cuDNN {figures.get('cudnn')}; "
          f"installed {figures.get('installed')}")
    attention_check_figures = part("attention")
    for label, check in (("attention kernel", attention_check_figures),
                         ("attention fallback", attention_check_figures.get("fallback"))):
        if check is not None:
            line(label, check, lambda c=check: (
                f"{c['kernel']} (with Ring: {c['ring_kernel']}), max error vs fp32 math {c['max_abs_error']:.2e} / "
                f"{c['ring_max_abs_error']:.2e}, lse {c['ring_lse_max_abs_error']:.2e}"))
    fp8 = part("fp8")
    line("fp8 weights multiply by", fp8, lambda: (
        f"{fp8['compute']} (fp8 product vs cast path: relative error {fp8['relative_error']:.3f}, within fp8 "
        f"input rounding: {fp8['within_fp8_rounding']}, {fp8['tflops']:.1f} TFLOP/s; fast accumulation "
        f"{fp8['fast_accumulation_relative_error']:.3f}, {fp8['fast_accumulation_within_fp8_rounding']}, "
        f"{fp8['fast_accumulation_tflops']:.1f} TFLOP/s)"))
    choice = fp8.get("pool_choice") or {"skipped": "not run"}
    line("fp8 pool keeps", choice, lambda: choice["note"])
    for dtype in WEIGHT_DTYPES:
        dit = part("dit", dtype)
        line(f"DiT {dtype}", dit, lambda: (f"built in {dit['build_seconds']:.1f} s, weights {gb(dit['weight_bytes'])} "
                                           f"(planner {gb(dit['planned_weight_bytes'])})"))
        for run in dit.get("runs", []):
            line(f"  {run['video']}", run, lambda r=run: (
                f"{r['seconds_per_forward']:.3f} s/forward, {r['achieved_tflops']:.1f} TFLOP/s "
                f"({pct(r['fraction_of_bf16_peak'])} of dense bf16 peak), peak {gb(r['peak_bytes'])} vs planner "
                f"{gb(r['planned_peak_bytes'])} (ratio {r['peak_ratio'] or float('nan'):.3f}), planner kernel "
                f"{r['planned_attention_kernel']}"))
    vae = part("vae")
    line("tiled VAE decode", vae, lambda: (
        f"{vae['video']} ({vae['tiles']} tiles, {vae['tile_spec']}): {vae['seconds']:.1f} s, peak "
        f"{gb(vae['peak_bytes'])} vs planner {gb(vae['planned_peak_bytes'])}"))
    conv = part("vae_conv")
    line("VAE conv3d settings", conv, lambda: (
        f"rank keeps {conv['rank_keeps']} ({conv['speedup_vs_default']:.2f}x the default) at {conv['shape']}"))
    pool = part("pool")
    line("1-rank pool", pool, lambda: (f"on {pool['device']}, started in {pool['start_seconds']:.1f} s, one step "
                                       f"{pool['step_seconds']:.3f} s"))
    collectives = part("collectives")
    line("Ulysses all-to-all, 2 ranks", collectives, lambda: (
        f"{collectives['backend']} at {collectives['video']}: {collectives['all_to_all_ms_per_block']:.2f} ms per "
        f"block ({collectives['gb_per_s_per_rank']:.1f} GB/s per rank), NCCL P2P/NVLink: "
        f"{collectives['nccl_p2p_or_nvlink']}"))
    lines_per_run("multi-GPU NCCL pools", part("multi_gpu"), lambda name: f"NCCL pool {name}",
                  lambda run: f"{run['degrees']}: step {run['step_seconds']:.3f} s")
    choice = part("kernel_choice")
    line("attention kernels measured", choice, lambda: "; ".join(
        f"{name}: {c['chosen']} of {c['tflops']}" for name, c in choice.items() if isinstance(c, dict)))
    compiled = part("compile")
    line("bf16 forward with compile", compiled, lambda: (
        f"first {compiled['first_compiled_forward_s']:.1f} s, eager {compiled['eager_forward_s']:.3f} s, compiled "
        f"{compiled['compiled_forward_s']:.3f} s ({compiled['speedup']:.2f}x), max difference "
        f"{compiled['max_abs_difference']:.2e}"))
    lines_per_run("2-rank pool, sharded vs replicated weights", part("sharded"),
                  lambda weights: f"2-rank pool, {weights} weights, 848x480x49 (demo DiT)",
                  lambda run: f"step {run['step_seconds']:.3f} s, finite {run['latent_finite']}")
    seconds = {".".join(k): v for k, v in section_seconds(figures).items()}
    print(f"section seconds (measured / estimate on one H200): {seconds}")
    print(f"goals: {figures['goals']}; failed: {figures['failed_sections'] or 'none'}; "
          f"total {figures['total_seconds']:.0f} s")


def section_seconds(figures: dict) -> dict:
    """{section key: (measured seconds or None when skipped, estimate)} of every section."""
    found = {}
    for section in SECTIONS:
        part = figures
        for key in section.key:
            part = part.get(key, {})
        measured = part.get("section_seconds")
        found[section.key] = (None if measured is None else round(measured, 1), section.estimate_s)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="demo-size models and videos (seconds, any device)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated section names to run (e.g. attention,fp8); default all: "
                             + ", ".join(".".join(s.key) for s in SECTIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU here; run with --tiny --device cpu for the CPU rehearsal", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    sections = SECTIONS
    if args.sections is not None:
        wanted = set(args.sections.split(","))
        sections = tuple(s for s in SECTIONS if ".".join(s.key) in wanted or s.key[0] in wanted)
        if not sections:
            print(f"--sections {args.sections}: no such section; use some of "
                  + ", ".join(".".join(s.key) for s in SECTIONS), file=sys.stderr)
            return 2
    started = time.perf_counter()
    figures = {"device": device.type, "tiny": args.tiny, "torch": torch.__version__}
    try:  # the header too: nothing before the JSON line may end the run
        mode = TINY if args.tiny else FULL
        installed = InstalledKernels.detect()
        gpu = gpu_entry(device)
        figures.update({
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpu_table": None if gpu is None else gpu.name,
            "peak_bf16_tflops": None if gpu is None else gpu.bf16_tflops,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "installed": {"flash_attn": installed.flash_attn, "flash_attn_3": installed.flash_attn_3,
                          "xfuser": installed.xfuser, "capability": installed.cuda_capability,
                          "cudnn": installed.cudnn_version},
        })
        with tempfile.TemporaryDirectory(prefix="mochi_xdit_acceptance_") as folder:
            run = Run(mode, device, installed, folder)
            run.figures = figures
            run_sections(sections, run)
    except Exception as error:  # recorded; the JSON line still prints
        traceback.print_exc()
        figures["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    return finish(figures, started)


def finish(figures: dict, started: float) -> int:
    """Goals, failures, the summary and the JSON line (always printed, whatever failed); exit status."""
    figures["total_seconds"] = time.perf_counter() - started
    try:
        figures["goals"] = goals(figures)
    except Exception as error:
        figures["goals"] = {"error": f"{type(error).__name__}: {error}"}
    figures["failed_sections"] = failures(figures)
    try:
        print_summary(figures)
    except Exception:  # a summary that cannot print must not cost the JSON line
        traceback.print_exc()
    print(json.dumps(figures, default=str), flush=True)
    return 1 if figures["failed_sections"] else 0


def kernel_choice_figures(mode: Mode, device: torch.device, installed: InstalledKernels) -> dict:
    """Each kernel's TFLOP/s on one forward's attention shape [1, heads, S, Dh] (the first video),
    as a pool measures it, without and with the log-sum-exp (Ring)."""
    config = mode.dit
    _, _, T, H, W = latent_shape_for_video(*mode.videos[0])
    tokens = T * (H // config.patch_size) * (W // config.patch_size) + TEXT_TOKENS
    generator = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(1, config.num_heads, tokens, config.head_dim, generator=generator, device=device,
                           dtype=default_compute_dtype(device)) for _ in range(3))
    figures = {}
    for need_lse in (False, True):
        choice = KernelChoice(AttentionConfig(installed=installed), measure=True)
        choice.kernel(q, k, v, need_lse)
        (measurement,) = choice.measurements.values()
        print(f"  {measurement.summary()}", flush=True)
        figures["ring" if need_lse else "plain"] = {
            "shape": list(q.shape), "chosen": measurement.chosen.value,
            "tflops": {kernel.value: measurement.tflops(kernel) for kernel in measurement.seconds},
            "left_out": {kernel.value: reason for kernel, reason in measurement.rejected.items()}}
    return figures


def compile_figures(mode: Mode, device: torch.device) -> dict:
    """One bf16 forward of the first video eager and with DiTCompile.ON (the same weights)."""
    from mochi_xdit.mochi.dit import DiTCompile, MochiDiT

    eager = random_dit(mode.dit, "bf16", device, seed=0)
    with torch.device("meta"):
        compiled = MochiDiT(mode.dit, compile=DiTCompile.ON)
    compiled.load_state_dict(eager.state_dict(), assign=True)  # shares the tensors: no second copy
    positive, _ = text_conditions()
    latent = torch.randn(latent_shape_for_video(*mode.videos[0]), device=device, dtype=torch.bfloat16)
    inputs = (latent, torch.tensor([0.7], device=device), positive.features.to(device), positive.mask.to(device))

    def forward(model) -> tuple[float, torch.Tensor]:
        synchronize(device)
        start = time.perf_counter()
        out = model(*inputs)
        synchronize(device)
        return time.perf_counter() - start, out

    with torch.no_grad():
        forward(eager)  # warm-up
        first, _ = forward(compiled)
        eager_s, expected = forward(eager)
        compiled_s, got = forward(compiled)
    return {"first_compiled_forward_s": first, "eager_forward_s": eager_s, "compiled_forward_s": compiled_s,
            "speedup": eager_s / compiled_s, "max_abs_difference": (got.float() - expected.float()).abs().max().item()}


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
