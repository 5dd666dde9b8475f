"""What the Ray pool costs on top of the same work done in-process.

Same DiT (random weights, sized so one CFG step takes >= 100 ms on one CPU thread), same request,
one rank with one thread on both sides, so the only difference is the pool: request shipping,
one actor call per step, the lockstep wait, returning the latent. The two runs are interleaved
step by step (the in-process step runs inside the pool's progress callback, whose time is not
counted for the pool), so both see the same machine load. Pool start-up (Ray, actor, weight
loading) happens once per pool and is reported separately.

Prints, from one run:
- per-step overhead = driver wall time of a pool step - the rank's own compute time for it
  (median over steps; measured on the same step, so machine noise largely cancels);
- per-step difference = median pool step wall time - median in-process step time;
- end to end = (pool.sample total - in-process generate total) / in-process total, in percent.
Goals (DESIGN.md section 8): <= 2 ms per step, <= 2 % end to end.

    python bench/pool_overhead.py [--steps 12] [--repeats 2]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import load_dit
from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.workers.pool import Pool
from mochi_xdit.workers.protocol import PoolSpec
from mochi_xdit.workers.ray_runtime import shutdown_ray

BENCH_CONFIG = DiTConfig(depth=6, num_heads=4, head_dim=64, hidden_size_x=256, hidden_size_y=128,
                         mlp_hidden_x=768, mlp_hidden_y=512, t5_feat_dim=4096)
LATENT_SHAPE = (1, 12, 4, 16, 16)  # 4 x 8 x 8 = 256 video tokens


def interleaved_run(pool, dit, request) -> dict:
    """One pool run and one in-process run of the same request, interleaved step by step (the
    in-process step runs inside the pool's progress callback), so both see the same machine load.

    Returns per-step lists (pool wall, rank compute, in-process) and both totals; the pool total
    excludes the time spent inside the callback.
    """
    local = DenoiseLoop(dit, request)
    timings = {"pool_wall": [], "rank_compute": [], "local_step": [], "in_callback": 0.0, "local_total": 0.0}
    stamp = [0.0]

    def on_step(report):
        entered = time.perf_counter()
        timings["pool_wall"].append(entered - stamp[0])
        timings["rank_compute"].append(report.seconds)
        t0 = time.perf_counter()
        local.step(report.index)
        timings["local_step"].append(time.perf_counter() - t0)
        stamp[0] = time.perf_counter()
        timings["in_callback"] += stamp[0] - entered

    t0 = time.perf_counter()
    local.begin()
    timings["local_total"] += time.perf_counter() - t0
    start = stamp[0] = time.perf_counter()
    pool_latent = pool.sample(request, on_step=on_step)
    timings["pool_total"] = time.perf_counter() - start - timings["in_callback"]
    t0 = time.perf_counter()
    local_latent = local.finish()
    timings["local_total"] += time.perf_counter() - t0 + sum(timings["local_step"])
    assert (pool_latent - local_latent).abs().max().item() <= 1e-5, "the pool computed something else"
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="alternating in-process / pool runs")
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
    pool = Pool(PoolSpec(dit_path, None, "fp32", ParallelConfig(1, num_heads=BENCH_CONFIG.num_heads),
                         device="cpu", cpu_threads=1))
    startup = time.perf_counter() - start
    try:
        interleaved_run(pool, dit, request)  # warm-up both sides (allocator, first-call costs)
        local_totals, local_steps, pool_totals, pool_walls, overheads = [], [], [], [], []
        for _ in range(args.repeats):
            timings = interleaved_run(pool, dit, request)
            local_totals.append(timings["local_total"])
            pool_totals.append(timings["pool_total"])
            local_steps += timings["local_step"][1:]
            pool_walls += timings["pool_wall"][1:]  # the first wall time also holds begin()
            overheads += [w - c for w, c in zip(timings["pool_wall"][1:], timings["rank_compute"][1:])]
    finally:
        pool.shutdown()
        shutdown_ray()

    step_ms = statistics.median(local_steps) * 1e3
    pool_step_ms = statistics.median(pool_walls) * 1e3
    overhead_ms = statistics.median(overheads) * 1e3
    local_total, pool_total = sum(local_totals), sum(pool_totals)
    end_to_end = (pool_total - local_total) / local_total * 100
    print(f"model: depth {BENCH_CONFIG.depth}, width {BENCH_CONFIG.hidden_size_x}, latent {LATENT_SHAPE}, cfg 4.5, "
          f"{args.steps} steps x {args.repeats} runs, 1 rank x 1 thread")
    print(f"pool start-up (Ray + actor + weights, once per pool): {startup:.1f} s")
    print(f"in-process step (median):        {step_ms:8.1f} ms")
    print(f"pool step, driver wall (median): {pool_step_ms:8.1f} ms")
    print(f"per-step overhead, wall - rank compute (median): {overhead_ms:6.2f} ms   goal <= 2 ms")
    print(f"per-step difference, pool - in-process (median): {pool_step_ms - step_ms:6.2f} ms")
    print(f"end to end ({args.repeats} runs): in-process {local_total:.3f} s, pool {pool_total:.3f} s -> overhead "
          f"{end_to_end:+.2f} %   goal <= 2 %")
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
