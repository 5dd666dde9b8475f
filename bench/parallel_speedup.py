"""Speedup of 2 CPU ranks x 1 thread over 1 rank x 1 thread, for CFG 2, Ulysses 2 and Ring 2.

One sampler step of a compute-bound DiT (fp32): with CFG the baseline runs the conditional and the
unconditional forward, the CFG layout runs one on each rank and exchanges them (`gather_cfg`);
for Ulysses and Ring the baseline runs one forward over all tokens and the two ranks split the
sequence. Everything runs in ONE gloo launch of two processes: rank 0 alone times the baseline
while rank 1 waits at a barrier (asleep in a socket read), then both time the parallel step;
baseline and parallel steps are interleaved, repeated, and the median is reported.

Wall time is the goal's measure but is noisy on a shared machine; process CPU time (one compute
thread, gloo's threads included) is printed too and is stable: CPU speedup = baseline CPU time /
the busier rank's CPU time (it does not see time spent waiting for the other rank).
Goals: CFG >= 1.92x, Ulysses >= 1.80x, Ring >= 1.75x.

    python bench/parallel_speedup.py [--frames 3] [--height 48] [--width 64] [--heads 12] [--repeats 3]
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.testing import run_ranks

LAYOUTS = {"cfg2": (2, 1, 1), "ulysses2": (1, 2, 1), "ring2": (1, 1, 2)}
GOALS = {"cfg2": 1.92, "ulysses2": 1.80, "ring2": 1.75}


def build(args):
    width = 64 * args.heads
    config = DiTConfig(
        depth=args.depth, num_heads=args.heads, head_dim=64, hidden_size_x=width, hidden_size_y=width // 2,
        mlp_hidden_x=(8 * width // 3 + 255) // 256 * 256, mlp_hidden_y=(4 * width // 3 + 255) // 256 * 256,
        t5_feat_dim=512,
    )
    model = MochiDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=0))
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 12, args.frames, args.height, args.width, generator=generator)
    features = torch.randn(1, 256, config.t5_feat_dim, generator=generator)
    cond_mask = torch.zeros(1, 256, dtype=torch.int64)
    cond_mask[:, : args.text_tokens] = 1
    uncond_mask = torch.zeros(1, 256, dtype=torch.int64)  # empty negative prompt
    sigma = torch.tensor([0.5])
    return model.eval(), (latent, sigma, features, cond_mask), (latent, sigma, features, uncond_mask)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def rank_main(args) -> dict:
    model, cond, uncond = build(args)
    rank = dist.get_rank()
    contexts = {name: ParallelContext(ParallelConfig(2, *degrees, num_heads=args.heads)) for name, degrees in LAYOUTS.items()}

    def baseline(name):
        model(*cond)
        if name == "cfg2":
            model(*uncond)

    def parallel(name):
        ctx = contexts[name]
        if name == "cfg2":
            ctx.gather_cfg(model(*(cond if ctx.cfg_rank == 0 else uncond), ctx=ctx))
        else:
            model(*cond, ctx=ctx)
        dist.barrier()  # the step ends when the slower rank is done

    times = {name: {"base": [], "par": []} for name in LAYOUTS}
    times["together"] = []
    for name in LAYOUTS:  # warm-up: allocator, gloo connections
        parallel(name)
    if rank == 0:
        model(*cond)
    for _ in range(args.repeats):
        for name in LAYOUTS:
            dist.barrier()
            if rank == 0:
                times[name]["base"].append(timed(lambda: baseline(name)))
            dist.barrier()
            times[name]["par"].append(timed(lambda: parallel(name)))
        # The machine's own ceiling: both ranks run an independent full forward at the same time
        # (no communication); compared with rank 0's forward alone it shows how much two busy
        # cores slow each other down (shared caches and memory bandwidth).
        dist.barrier()
        times["together"].append(timed(lambda: model(*cond)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12, help="heads of 64 channels (width = 64 x heads)")
    parser.add_argument("--frames", type=int, default=3, help="latent frames T")
    parser.add_argument("--height", type=int, default=48, help="latent height")
    parser.add_argument("--width", type=int, default=64, help="latent width")
    parser.add_argument("--text-tokens", type=int, default=32, help="valid tokens of the positive prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"DiT depth {args.depth}, width {64 * args.heads} ({args.heads} heads x 64), {tokens} video tokens, "
          f"{args.text_tokens} text tokens, fp32; load average before: {os.getloadavg()[0]:.1f}")
    per_rank = run_ranks(rank_main, 2, args, timeout_s=3600, collective_timeout_s=1800)
    print(f"load average after: {os.getloadavg()[0]:.1f} (2 cores)")
    alone_cpu = statistics.median(c for _, c in per_rank[0]["ulysses2"]["base"])
    together_cpu = statistics.median(max(r["together"][i][1] for r in per_rank) for i in range(args.repeats))
    print(f"ceiling: one forward alone {alone_cpu:.2f}s CPU, two at once {together_cpu:.2f}s CPU each -> "
          f"at most {2 * alone_cpu / together_cpu:.2f}x from 2 ranks on this machine")
    print("wall: median of the repeats, and best (min) of the repeats, which other processes disturb least")
    print(f"{'layout':10} {'1 rank wall':>12} {'2 ranks wall':>13} {'speedup':>8} {'best':>6} {'1 rank CPU':>11} "
          f"{'2 ranks CPU':>12} {'CPU speedup':>12} {'goal':>6}")
    for name in LAYOUTS:
        base_walls = [w for w, _ in per_rank[0][name]["base"]]
        par_walls = [max(r[name]["par"][i][0] for r in per_rank) for i in range(args.repeats)]
        base_wall, par_wall = statistics.median(base_walls), statistics.median(par_walls)
        best = min(base_walls) / min(par_walls)
        base_cpu = statistics.median(c for _, c in per_rank[0][name]["base"])
        par_cpu = statistics.median(max(r[name]["par"][i][1] for r in per_rank) for i in range(args.repeats))
        print(f"{name:10} {base_wall:11.2f}s {par_wall:12.2f}s {base_wall / par_wall:7.2f}x {best:5.2f}x "
              f"{base_cpu:10.2f}s {par_cpu:11.2f}s {base_cpu / par_cpu:11.2f}x {GOALS[name]:5.2f}x")


if __name__ == "__main__":
    main()
