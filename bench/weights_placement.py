"""Weight placement on the demo-size DiT over gloo CPU ranks: step time, per-rank weight bytes, and
the blocks' all-gather share of a sharded step.

For each world size, every rank builds the demo DiT (random weights, 2 blocks; the depth can be
raised with --depth to make the blocks' share of the weights more like the 48-block model's) and
times sampling steps (cfg 4.5, cfg-parallel halves, the rest Ulysses) with the weights
- replicated (every rank holds everything),
- sharded (FSDP2 over the whole world, 1/N of every block per rank),
- offload as a CPU pool runs it (a no-op: the weights are already in host memory), and
- streamed: the offload mechanism itself on a CPU "device" (each block copied before it runs),
  which is what offload costs beyond the host-to-GPU copy on a GPU.
It prints the median step time (after a warm-up step), each rank's weight bytes (parameters and
buffers it holds; sharded tensors count their local shard), and for sharded the time of the
blocks' all-gathers alone (`unshard` / `reshard` of every block, as many times as a step runs
the blocks) as a share of the sharded step. On CPU with gloo nothing overlaps the gather, so the
share is an upper bound of what a GPU run would expose.

    python bench/weights_placement.py [--worlds 2 4] [--depth 8] [--frames 13] [--height 160] [--width 256] [--steps 5]
"""

import argparse
import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.dit import MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.testing import run_ranks
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest, latent_shape_for_video
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.mochi.weight_placement import BlockStreamer, WeightPlacement, local_weight_bytes, place_weights


def build(config) -> MochiDiT:
    with torch.device("meta"):
        model = MochiDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=0), assign=True)
    return model.eval().requires_grad_(False)


def request(latent_shape, steps: int) -> SampleRequest:
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, :20] = 1
    positive = TextCondition(torch.randn(1, 256, 4096, generator=generator), mask)
    return SampleRequest(positive, TextCondition.empty(), latent_shape=latent_shape, seed=2, steps=steps, cfg=4.5)


def step_times(model, ctx, sample: SampleRequest) -> list[float]:
    loop = DenoiseLoop(model, sample, ctx=ctx)
    loop.begin()
    times = []
    for i in range(loop.num_steps):
        dist.barrier()
        start = time.perf_counter()
        loop.step(i)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step warms up


def gather_seconds(model, calls: int, repeats: int = 3) -> float:
    """Seconds of the blocks' all-gathers of one step (each block gathered `calls` times)."""
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            for block in model.blocks:
                block.unshard()
                block.reshard()
        dist.barrier()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def rank_main(world: int, depth: int, latent_shape, steps: int) -> dict:
    config = dataclasses.replace(DEMO_DIT_CONFIG, depth=depth)
    ulysses = max(1, world // 2)
    ctx = ParallelContext(ParallelConfig(world, 2, ulysses, 1, num_heads=config.num_heads))
    sample = request(latent_shape, steps)
    results = {}
    for placement in ("replicated", "sharded", "offload", "streamed"):
        model = build(config)
        if placement == "streamed":
            BlockStreamer(model, torch.device("cpu"))
        else:
            place_weights(model, WeightPlacement(placement), torch.device("cpu"))
        results[placement] = {
            "step_s": statistics.median(step_times(model, ctx, sample)),
            "bytes": local_weight_bytes(model),
            "block_bytes": local_weight_bytes(model.blocks),
        }
        if placement == "sharded":
            results[placement]["gather_s"] = gather_seconds(model, calls=1)  # cfg-parallel: one forward per rank
    ctx.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    latent_shape = latent_shape_for_video(args.width, args.height, args.frames)
    print(f"demo DiT, depth {args.depth}, latent {list(latent_shape)}, cfg 4.5 on cfg-parallel halves, "
          f"{args.steps - 1} timed steps (median), one thread per rank")
    for world in args.worlds:
        results = run_ranks(rank_main, world, world, args.depth, latent_shape, args.steps, timeout_s=1200)
        slowest = {p: max(r[p]["step_s"] for r in results) for p in results[0]}
        full, blocks = results[0]["replicated"]["bytes"], results[0]["replicated"]["block_bytes"]
        print(f"\nworld {world}: whole DiT {full / 2**20:.1f} MiB, of which blocks {blocks / 2**20:.1f} MiB")
        print("| weights | step s (slowest rank) | vs replicated | rank weight MiB (max) | share of the DiT | "
              "block MiB per rank | share of the blocks |")
        print("|---|---|---|---|---|---|---|")
        for placement, seconds in slowest.items():
            held = max(r[placement]["bytes"] for r in results)
            held_blocks = max(r[placement]["block_bytes"] for r in results)
            print(f"| {placement} | {seconds:.3f} | {seconds / slowest['replicated']:.2f}x | {held / 2**20:.1f} | "
                  f"{held / full:.3f} | {held_blocks / 2**20:.2f} | {held_blocks / blocks:.3f} |")
        gather = max(r["sharded"]["gather_s"] for r in results)
        print(f"sharded: the blocks' all-gathers alone take {gather * 1e3:.1f} ms per step, "
              f"{gather / slowest['sharded']:.0%} of the sharded step (gloo on CPU, nothing overlapped)")


if __name__ == "__main__":
    main()
