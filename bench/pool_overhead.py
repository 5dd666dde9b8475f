"""What the Ray pool costs on top of the same work done in-process.

Same DiT (random weights, sized so one CFG step takes >= 100 ms on one CPU thread), same request,
one rank with one thread on both sides, so the only difference is the pool: request shipping,
one actor call per step (the next step is queued while the current one runs), returning the
latent. In-process and pool runs alternate. Pool start-up (Ray, actor, weight loading) happens
once per pool and is reported separately.

Prints, from one invocation:
- per-step overhead = (pool wall time outside the rank's step compute - in-process time outside
  its step compute) / steps: what the pool adds, measured apart from how fast the CPU happens to
  be for each side on a shared machine;
- end to end = (pool total - in-process total) / in-process total, in percent.
Goals (DESIGN.md section 8): <= 2 ms per step, <= 2 % end to end.

It also measures the driver-side path, where a sampler runs in this process (ComfyUI's own samplers
do, through `nodes/comfy_sampling.py`) and each step is one lockstep model evaluation on the pool
(`Pool.evaluations`): here driven by k-diffusion's Euler written out, which is what ComfyUI's `euler`
computes per step. Its per-step overhead is measured the same way (outside the ranks' evaluation
compute, minus the in-process loop's outside time) and set beside the on-rank path's. Unlike the
on-rank path, it ships the latent both ways every evaluation (a private pool through shared files,
`workers/shared_latent.py`; a cluster pool through Ray's object store: both round trips are timed,
alternating, and their ratio printed), so for a full-size step it is extrapolated: the measured
overhead + (the measured round trip of a full-size latent [1, 12, 28, 60, 106] fp32 - that of the
bench latent) + the driver's Euler update on a full-size latent; and set against a full-size step
time taken as the planner's counted FLOPs of
one 848x480x163 step (cfg 4.5, one rank) at 50 % of an H100's dense bf16 peak (an assumption:
published Mochi runs reach 45-55 %), and the same on 8 ranks with perfect scaling.

    python bench/pool_overhead.py [--steps 12] [--repeats 3]
"""

import argparse
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

import ray

from mochi_xdit.mochi.checkpoint import load_dit
from mochi_xdit.mochi.latent import comfy_noise, to_vae_space
from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.workers.protocol import PoolSpec
from mochi_xdit.workers.service import MochiService

BENCH_CONFIG = DiTConfig(depth=6, num_heads=4, head_dim=64, hidden_size_x=256, hidden_size_y=128,
                         mlp_hidden_x=768, mlp_hidden_y=512, t5_feat_dim=4096)
LATENT_SHAPE = (1, 12, 4, 16, 16)  # 4 x 8 x 8 = 256 video tokens
FULL_WIDTH, FULL_HEIGHT, FULL_FRAMES = 848, 480, 163
FULL_LATENT_SHAPE = (1, 12, 28, 60, 106)  # latent_shape_for_video(848, 480, 163)
ASSUMED_MFU = 0.5  # fraction of dense bf16 peak a full-size step reaches (published Mochi runs: 45-55 %)


def in_process_run(dit, request) -> tuple[float, float, torch.Tensor]:
    """(total seconds, seconds inside step(), latent) of the single-process loop."""
    start = time.perf_counter()
    loop = DenoiseLoop(dit, request)
    loop.begin()
    stepping = 0.0
    for i in range(loop.num_steps):
        t0 = time.perf_counter()
        loop.step(i)
        stepping += time.perf_counter() - t0
    latent = loop.finish()
    return time.perf_counter() - start, stepping, latent


def pool_run(pool, request) -> tuple[float, float, torch.Tensor]:
    """(total seconds, seconds the rank spent inside step(), latent) of one pool run."""
    computes = []
    start = time.perf_counter()
    latent = pool.sample(request, on_step=lambda report: computes.append(report.seconds))
    return time.perf_counter() - start, sum(computes), latent


def driver_run(pool, request) -> tuple[float, float, torch.Tensor]:
    """(total seconds, seconds the ranks spent evaluating, latent) of k-diffusion's Euler run in this
    process on the pool's model evaluations (x0 = evaluate(x); d = (x - x0) / sigma; x += dt * d)."""
    computes = []
    start = time.perf_counter()
    with pool.evaluations(request.positive, request.negative, on_evaluation=computes.append) as evaluate:
        sigmas = request.sigmas
        x = sigmas[0] * comfy_noise(request.shape, request.seed)  # empty latent: x0 = 0
        for i, scale in enumerate(request.cfg_scales):
            x0 = evaluate(x, sigmas[i], scale)
            x = x + (sigmas[i + 1] - sigmas[i]) * ((x - x0) / sigmas[i])
    latent = to_vae_space(x)
    return time.perf_counter() - start, sum(computes), latent


@ray.remote(num_cpus=0)
class _Echo:
    """A latent's round trip driver -> actor -> driver, moved as `Pool.evaluations` and
    `RankWorker.evaluate` move it: through the object store (numpy, a torch copy at each end; what a
    cluster pool does) or through the driver's shared files (a private pool)."""

    def echo(self, latent):
        return (torch.from_numpy(latent.copy()) + 0.0).numpy()

    def shared_echo(self, files):
        from mochi_xdit.workers.shared_latent import map_float32

        latent = map_float32(files.input_path, files.input_shape)
        map_float32(files.output_path, files.output_shape).copy_(latent + 0.0)


def latent_round_trips_ms(shape: tuple[int, ...], repeats: int = 5) -> tuple[float, float]:
    """Median ms of one latent's round trip, what an evaluation moves besides the call itself:
    (through Ray's object store, through shared files), alternating."""
    from mochi_xdit.workers.shared_latent import SharedLatents

    echo = _Echo.remote()
    latent = torch.randn(shape)
    shared = SharedLatents()

    def object_store():
        return torch.from_numpy(ray.get(echo.echo.remote(ray.put(latent.numpy()))).copy())

    def shared_files():
        ray.get(echo.shared_echo.remote(shared.send(latent, shape)))
        return shared.receive()

    times = {object_store: [], shared_files: []}
    try:
        for trip in times:
            assert torch.equal(trip(), latent)  # warm-up, and both carry the latent exactly
        for _ in range(repeats):
            for trip, spent in times.items():
                start = time.perf_counter()
                trip()
                spent.append(time.perf_counter() - start)
    finally:
        shared.close()
        ray.kill(echo)
    return tuple(sorted(spent)[len(spent) // 2] * 1e3 for spent in times.values())


def driver_update_ms(shape: tuple[int, ...], repeats: int = 5) -> float:
    """Median ms of the driver's Euler update on a latent of this shape."""
    x, x0 = torch.randn(shape), torch.randn(shape)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = x + (0.4 - 0.5) * ((x - x0) / 0.5)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def full_size_step_s() -> tuple[float, float]:
    """(planner-counted FLOPs of one 848x480x163 step with CFG on one rank, seconds at ASSUMED_MFU of an H100)."""
    from mochi_xdit.mochi.parallel.config import ParallelConfig as Degrees
    from mochi_xdit.mochi.planner import get_gpu
    from mochi_xdit.mochi.planner.simulate import count_step

    flops = count_step(Degrees(1, num_heads=24), FULL_WIDTH, FULL_HEIGHT, FULL_FRAMES, "bf16").total_flops
    return flops, flops / (ASSUMED_MFU * get_gpu("H100").bf16_tflops * 1e12)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="alternating in-process / pool runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder = tempfile.mkdtemp(prefix="mochi_xdit_bench_")
    dit_path = f"{folder}/bench_dit.safetensors"
    save_file(random_dit_state_dict(BENCH_CONFIG, seed=0), dit_path)
    generator = torch.Generator().manual_seed(0)
    positive = TextCondition(torch.randn(1, 256, 4096, generator=generator),
                             torch.tensor([[1] * 40 + [0] * 216]))
    request = SampleRequest(positive, TextCondition.empty(256), latent_shape=LATENT_SHAPE, seed=1,
                            steps=args.steps, cfg=4.5)

    dit = load_dit(dit_path, "fp32", "cpu")
    start = time.perf_counter()
    service = MochiService(log=lambda line: None)
    pool = service.pool(PoolSpec(dit_path, None, "fp32", ParallelConfig(1, num_heads=BENCH_CONFIG.num_heads),
                                 device="cpu", cpu_threads=1))
    startup = time.perf_counter() - start
    try:
        in_process_run(dit, request)  # warm-up both sides (allocator, first-call costs)
        pool.sample(request)
        driver_run(pool, request)
        runs, driver_runs = [], []
        for _ in range(args.repeats):  # alternate, so slow phases of a busy machine hit both sides
            local_total, local_stepping, local_latent = in_process_run(dit, request)
            pool_total, rank_stepping, pool_latent = pool_run(pool, request)
            assert (pool_latent - local_latent).abs().max().item() <= 1e-5, "the pool computed something else"
            runs.append((local_total, local_stepping, pool_total, rank_stepping))
            driver_total, rank_evaluating, driver_latent = driver_run(pool, request)
            scale = max(1.0, local_latent.abs().max().item())
            assert (driver_latent - local_latent).abs().max().item() <= 1e-5 * scale, "driver-side Euler differs"
            driver_runs.append((driver_total, rank_evaluating))
        store_bench, shared_bench = latent_round_trips_ms(LATENT_SHAPE)
        store_full, shared_full = latent_round_trips_ms(FULL_LATENT_SHAPE)
    finally:
        service.shutdown()

    steps = args.steps * args.repeats
    local_total = sum(r[0] for r in runs)
    pool_total = sum(r[2] for r in runs)
    local_outside = sum(r[0] - r[1] for r in runs)  # begin + finish, in-process
    pool_outside = sum(r[2] - r[3] for r in runs)  # everything the rank was not stepping, pool
    overhead_ms = (pool_outside - local_outside) / steps * 1e3
    step_ms = sum(r[1] for r in runs) / steps * 1e3
    rank_step_ms = sum(r[3] for r in runs) / steps * 1e3
    end_to_end = (pool_total - local_total) / local_total * 100
    print(f"model: depth {BENCH_CONFIG.depth}, width {BENCH_CONFIG.hidden_size_x}, latent {LATENT_SHAPE}, cfg 4.5, "
          f"{args.steps} steps x {args.repeats} runs, 1 rank x 1 thread")
    print(f"pool start-up (Ray + actor + weights, once per pool): {startup:.1f} s")
    print(f"step compute: in-process {step_ms:.1f} ms, in the rank {rank_step_ms:.1f} ms (mean)")
    print(f"per-step overhead (pool time outside step compute - in-process time outside it) / steps: "
          f"{overhead_ms:.2f} ms   goal <= 2 ms")
    print(f"end to end ({args.repeats} alternating runs): in-process {local_total:.3f} s, pool {pool_total:.3f} s -> "
          f"{end_to_end:+.2f} %   goal <= 2 %")
    print(f"  of which outside step compute: {(pool_outside - local_outside) / local_total * 100:+.2f} % "
          "(the rest is the rank's step compute running slower or faster than in-process on a shared machine)")

    driver_outside = sum(total - evaluating for total, evaluating in driver_runs)
    driver_overhead_ms = (driver_outside - local_outside) / steps * 1e3
    print(f"driver-side path (sampler in this process, one Pool.evaluations call per step; ComfyUI's samplers): "
          f"per-step overhead {driver_overhead_ms:.2f} ms = {driver_overhead_ms / step_ms * 100:.2f} % of a "
          f"{step_ms:.0f} ms step; on-rank path {overhead_ms:.2f} ms = {overhead_ms / step_ms * 100:.2f} %")
    update_full, update_bench = driver_update_ms(FULL_LATENT_SHAPE), driver_update_ms(LATENT_SHAPE)
    # the bench's pool is private (shared files); a cluster pool moves latents through the object store
    extrapolated_ms = driver_overhead_ms + (shared_full - shared_bench) + (update_full - update_bench)
    cluster_ms = driver_overhead_ms + (store_full - shared_bench) + (update_full - update_bench)
    flops, full_step_s = full_size_step_s()
    print(f"full size {FULL_WIDTH}x{FULL_HEIGHT}x{FULL_FRAMES} (latent {FULL_LATENT_SHAPE} fp32, "
          f"{torch.Size(FULL_LATENT_SHAPE).numel() * 4 / 2**20:.1f} MiB): latent round trip through shared files "
          f"{shared_full:.1f} ms, through Ray's object store {store_full:.1f} ms ({store_full / shared_full:.1f}x; "
          f"bench latent {shared_bench:.1f} / {store_bench:.1f} ms), driver Euler update {update_full:.1f} ms")
    print(f"  -> driver-side overhead ~{extrapolated_ms:.1f} ms per evaluation on a private pool (shared files), "
          f"~{cluster_ms:.1f} ms on a cluster pool (object store)")
    print(f"  full-size step: planner count {flops / 1e12:,.0f} TFLOP (cfg 4.5, one rank) at {ASSUMED_MFU:.0%} of "
          f"H100 dense bf16 peak (an assumption) = {full_step_s:.2f} s -> driver-side overhead "
          f"{extrapolated_ms / 1e3 / full_step_s * 100:.3f} % of a step on 1 GPU, "
          f"{extrapolated_ms / 1e3 / (full_step_s / 8) * 100:.2f} % on 8 GPUs (perfect scaling; cluster pool "
          f"{cluster_ms / 1e3 / (full_step_s / 8) * 100:.2f} %); on-rank path "
          f"{overhead_ms / 1e3 / (full_step_s / 8) * 100:.3f} % on 8 GPUs")
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
