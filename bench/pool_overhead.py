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

    python bench/pool_overhead.py [--steps 12] [--repeats 3]
"""

import argparse
import os
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
from mochi_xdit.workers.protocol import PoolSpec
from mochi_xdit.workers.service import MochiService

BENCH_CONFIG = DiTConfig(depth=6, num_heads=4, head_dim=64, hidden_size_x=256, hidden_size_y=128,
                         mlp_hidden_x=768, mlp_hidden_y=512, t5_feat_dim=4096)
LATENT_SHAPE = (1, 12, 4, 16, 16)  # 4 x 8 x 8 = 256 video tokens


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
        runs = []
        for _ in range(args.repeats):  # alternate, so slow phases of a busy machine hit both sides
            local_total, local_stepping, local_latent = in_process_run(dit, request)
            pool_total, rank_stepping, pool_latent = pool_run(pool, request)
            assert (pool_latent - local_latent).abs().max().item() <= 1e-5, "the pool computed something else"
            runs.append((local_total, local_stepping, pool_total, rank_stepping))
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
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
