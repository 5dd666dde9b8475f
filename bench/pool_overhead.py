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
compute, minus the in-process loop's outside time) and set beside the on-rank path's.

Unlike the on-rank path, it moves the latent to the ranks and x0 back every evaluation, and ComfyUI's
own arithmetic (the Euler update) runs on the driver's CPU latent, so the full-size cost is measured
at full size: a second private 1-rank pool holds a DiT small enough to run on a full-size latent
[1, 12, 28, 60, 106] fp32 (depth 1, width 16: ~2.5 s per evaluation on one thread), and Euler runs
on it for `--full-evaluations`; per evaluation it times the evaluate call outside the rank's reported
compute (our path: the latent into the shared file, the Ray call, x0 back) and the Euler update
(ComfyUI's arithmetic, printed apart and counted). To that it adds what calling 8 ranks instead of
1 costs this process's CPU (measured with 8 idle actors), and sets the sum against a full-size step time
taken as the planner's counted FLOPs of one 848x480x163 step (cfg 4.5, one rank) at 50 % of an
H100's dense bf16 peak (an assumption: published Mochi runs reach 45-55 %), on 8 ranks with perfect
scaling. Goal (DESIGN.md section 8): <= 2 % at 8 GPUs. A GPU rank's host<->device copies of the
latent and x0 cannot be timed here; they are printed apart at an assumed rate. A cluster pool moves
the latent through Ray's object store instead of shared files: both round trips are timed with an
echo actor that moves it as a rank does, and the difference is added for the cluster figure.

    python bench/pool_overhead.py [--steps 12] [--repeats 3] [--full-evaluations 12]
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
# A DiT small enough to run on a full-size latent on one CPU thread (~2.5 s per evaluation): the
# driver-side path is timed at full size on it, outside the rank's compute.
FULL_PROBE_CONFIG = DiTConfig(depth=1, num_heads=1, head_dim=16, hidden_size_x=16, hidden_size_y=16,
                              mlp_hidden_x=32, mlp_hidden_y=32, t5_feat_dim=4096)
FULL_PROBE_WARMUP = 2  # evaluations not counted (the first forward measures the attention kernel)
ASSUMED_HOST_DEVICE_GBPS = 8.0  # pageable copies on a GPU rank (not measurable on this CPU machine)
WORLD_AT_SCALE = 8


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


def full_size_driver_evaluations(pool, evaluations: int) -> tuple[list[float], list[float]]:
    """k-diffusion's Euler on a full-size latent in this process, each step one evaluation on `pool`
    (cfg 1: one DiT pass; the latent moves the same as with CFG). Returns per counted evaluation
    (ms of the evaluate call outside the rank's compute, ms of the driver's Euler update)."""
    generator = torch.Generator().manual_seed(0)
    positive = TextCondition(torch.randn(1, 8, 4096, generator=generator), torch.ones(1, 8, dtype=torch.int64))
    sigmas = torch.linspace(1.0, 0.0, evaluations + 1).tolist()
    ours, updates, computes = [], [], []
    with pool.evaluations(positive, TextCondition.empty(8), on_evaluation=computes.append) as evaluate:
        x = torch.randn(FULL_LATENT_SHAPE, generator=generator)
        for i in range(evaluations):
            start = time.perf_counter()
            x0 = evaluate(x, sigmas[i], 1.0)
            evaluated = time.perf_counter()
            x = x + (sigmas[i + 1] - sigmas[i]) * ((x - x0) / sigmas[i])  # what ComfyUI's euler runs per step
            if i >= FULL_PROBE_WARMUP:
                ours.append((evaluated - start - computes[-1]) * 1e3)
                updates.append((time.perf_counter() - evaluated) * 1e3)
    return ours, updates


@ray.remote(num_cpus=0)
class _Idle:
    """A rank that answers at once: what the driver spends per rank to call and gather."""

    def evaluate(self, files, sigmas, cfg):
        return None, 0.0


def fan_out_ms(world: int, repeats: int = 40) -> float:
    """Median CPU ms of this process (all its threads, Ray's own included) to call `world` ranks and
    gather their answers as `Pool._gather` does: the driver's cost grows with the ranks (on this 2-core
    machine wall time would measure the ranks queueing for a core instead)."""
    ranks = [_Idle.remote() for _ in range(world)]
    times = []
    try:
        for i in range(repeats + 3):
            start = time.process_time()
            pending = [rank.evaluate.remote(None, [0.5], 4.5) for rank in ranks]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=30)
                for ref in ready:
                    ray.get(ref, timeout=0)
            if i >= 3:
                times.append(time.process_time() - start)
    finally:
        for rank in ranks:
            ray.kill(rank)
    return sorted(times)[len(times) // 2] * 1e3


@ray.remote(num_cpus=0)
class _Echo:
    """A latent's round trip driver -> actor -> driver, moved as `Pool.evaluations` and
    `RankWorker.evaluate` move it: through the object store (numpy in, copied into a buffer kept
    for the block, numpy out; what a cluster pool's rank 0 does) or through the driver's shared files
    (a private pool: each file mapped once per block, x0 written into the output file)."""

    def __init__(self):
        self.buffer = None
        self.mapped = {}

    def echo(self, latent):
        if self.buffer is None or tuple(self.buffer.shape) != latent.shape:
            self.buffer = torch.empty(latent.shape)
        self.buffer.copy_(torch.from_numpy(latent))
        return self.buffer.numpy()

    def _map(self, path, shape):
        from mochi_xdit.workers.shared_latent import map_float32

        if path not in self.mapped:
            self.mapped[path] = map_float32(path, shape)
        return self.mapped[path]

    def shared_echo(self, files):
        self._map(files.output_path, files.output_shape).copy_(self._map(files.input_path, files.input_shape))


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
        held = {}  # each route's last result stays held until its next one arrives, as a sampler's x0 does
        for trip in times:
            held[trip] = trip()
            assert torch.equal(held[trip], latent)  # warm-up, and both carry the latent exactly
        for _ in range(repeats):
            for trip, spent in times.items():
                start = time.perf_counter()
                held[trip] = trip()
                spent.append(time.perf_counter() - start)
    finally:
        shared.close()
        ray.kill(echo)
    return tuple(sorted(spent)[len(spent) // 2] * 1e3 for spent in times.values())


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


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
    parser.add_argument("--full-evaluations", type=int, default=12,
                        help=f"driver-side evaluations at full size (~2.5 s each; the first {FULL_PROBE_WARMUP} "
                             "not counted)")
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
        fan_one, fan_world = fan_out_ms(1), fan_out_ms(WORLD_AT_SCALE)
        probe_path = f"{folder}/full_probe_dit.safetensors"
        save_file(random_dit_state_dict(FULL_PROBE_CONFIG, seed=0), probe_path)
        probe = service.pool(PoolSpec(probe_path, None, "fp32", ParallelConfig(1, num_heads=FULL_PROBE_CONFIG.num_heads),
                                      device="cpu", cpu_threads=1))
        full_ours, full_updates = full_size_driver_evaluations(probe, args.full_evaluations)
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
    ours_ms, update_ms, fan_ms = _median(full_ours), _median(full_updates), fan_world - fan_one
    private_ms = ours_ms + update_ms + fan_ms
    copies_ms = 2 * torch.Size(FULL_LATENT_SHAPE).numel() * 4 / (ASSUMED_HOST_DEVICE_GBPS * 1e9) * 1e3
    cluster_ms = private_ms + store_full - shared_full  # rank 0's broadcast to the other ranks not counted
    flops, full_step_s = full_size_step_s()
    step_at_scale_ms = full_step_s / WORLD_AT_SCALE * 1e3

    def share(ms: float) -> float:
        """Percent of a full-size step on WORLD_AT_SCALE GPUs."""
        return ms / step_at_scale_ms * 100

    print(f"full size {FULL_WIDTH}x{FULL_HEIGHT}x{FULL_FRAMES} (latent {FULL_LATENT_SHAPE} fp32, "
          f"{torch.Size(FULL_LATENT_SHAPE).numel() * 4 / 2**20:.1f} MiB), the driver-side path measured on a private "
          f"1-rank pool with a DiT small enough for that latent (depth {FULL_PROBE_CONFIG.depth}, width "
          f"{FULL_PROBE_CONFIG.hidden_size_x}), k-diffusion's Euler, medians of {len(full_ours)} evaluations "
          f"(each {', '.join(f'{o:.1f}+{u:.1f}' for o, u in zip(full_ours, full_updates))} ms):")
    print(f"  our path (the evaluate call outside the rank's compute: latent into the shared file, the Ray call, "
          f"x0 back) {ours_ms:.1f} ms; ComfyUI's own Euler update on the driver's CPU latent (1 thread) "
          f"{update_ms:.1f} ms")
    print(f"  calling {WORLD_AT_SCALE} ranks instead of 1: +{fan_ms:.2f} ms (this process's CPU, {WORLD_AT_SCALE} idle "
          f"actors: {fan_world:.2f} ms vs {fan_one:.2f} ms)")
    print(f"  -> {private_ms:.1f} ms per evaluation on {WORLD_AT_SCALE} ranks; full-size step: planner count "
          f"{flops / 1e12:,.0f} TFLOP (cfg 4.5) at {ASSUMED_MFU:.0%} of H100 dense bf16 peak (an assumption) = "
          f"{full_step_s:.2f} s on 1 GPU, {step_at_scale_ms:.0f} ms on {WORLD_AT_SCALE} (perfect scaling) -> "
          f"driver-side overhead {private_ms / 1e3 / full_step_s * 100:.3f} % on 1 GPU, {share(private_ms):.2f} % on "
          f"{WORLD_AT_SCALE} GPUs   goal <= 2 %  (ComfyUI's Euler {share(update_ms):.2f} % of it, ours "
          f"{share(ours_ms + fan_ms):.2f} %); on-rank path {share(overhead_ms):.3f} %")
    print(f"  not measurable here: a GPU rank's host<->device copies of the latent and x0 (2 x "
          f"{torch.Size(FULL_LATENT_SHAPE).numel() * 4 / 2**20:.1f} MiB at an assumed {ASSUMED_HOST_DEVICE_GBPS:g} GB/s "
          f"= {copies_ms:.1f} ms; a CPU rank's reads and writes of the files are inside its compute time): with them "
          f"{share(private_ms + copies_ms):.2f} %")
    print(f"  latent round trip (an echo actor moving it as a rank does): shared files {shared_full:.1f} ms, Ray's "
          f"object store {store_full:.1f} ms ({store_full / shared_full:.1f}x; bench latent {shared_bench:.1f} / "
          f"{store_bench:.1f} ms) -> a cluster pool (object store to rank 0) ~{cluster_ms:.1f} ms = "
          f"{share(cluster_ms):.2f} % on {WORLD_AT_SCALE} GPUs")
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
