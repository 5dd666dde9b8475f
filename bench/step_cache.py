"""Step caching on the demo-size DiT: wall time, steps skipped and drift from the uncached result,
on 1 rank and on 2 gloo ranks.

For each cache setting (none, TeaCache at three thresholds, first-block cache at two) one whole
sampling run (random prompt features, empty negative prompt, cfg 4.5) is timed from the first
step to the last; the final VAE-space latent is compared with the uncached run of the same layout
(max and mean absolute difference), and the 2-rank runs with the 1-rank runs (same skipped steps,
max difference). CPU time (process, one compute thread; the busier rank for 2 ranks) is printed
beside wall time because the machine is shared.

The demo model has random weights, so its indicators are not a trained model's: on it the
first-block residual changes by 0.2-1.1 per step (TeaCache's input by 0.03-0.2), hence higher
first-block thresholds here than the 0.06 recommended for real Mochi weights. Its two blocks are
also cheap next to its full-size T5 pooling (the embedding is about a third of a forward at the
default size), which a skipped step still runs; on the 48-block model the blocks are over 99 % of a
step's FLOPs, so steps / computed is the speedup to expect there. Published for Mochi (TeaCache4Mochi, 848x480x163,
64 steps, one A800): 0.06 -> 1.5x, 0.09 -> 2.1x. Quality on real weights is not measured here.

    python bench/step_cache.py [--steps 48] [--frames 4] [--height 24] [--width 32] [--layout cfg2]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.dit import MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.testing import run_ranks
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
from mochi_xdit.mochi.step_cache import StepCacheKind, StepCacheSpec
from mochi_xdit.mochi.text import TextCondition

CASES = (
    None,
    StepCacheSpec(StepCacheKind.TEACACHE, 0.06),
    StepCacheSpec(StepCacheKind.TEACACHE, 0.09),
    StepCacheSpec(StepCacheKind.TEACACHE, 0.15),
    StepCacheSpec(StepCacheKind.FIRST_BLOCK, 0.3),
    StepCacheSpec(StepCacheKind.FIRST_BLOCK, 0.5),
)
LAYOUTS = {"cfg2": (2, 1, 1), "ulysses2": (1, 2, 1), "ring2": (1, 1, 2)}


def build_model() -> MochiDiT:
    with torch.device("meta"):  # skip a random init of the 50M-parameter T5 pool
        model = MochiDiT(DEMO_DIT_CONFIG)
    model.load_state_dict(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), assign=True)
    return model.eval()


def make_request(args, cache: StepCacheSpec | None) -> SampleRequest:
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, :20] = 1
    positive = TextCondition(torch.randn(1, 256, DEMO_DIT_CONFIG.t5_feat_dim, generator=generator), mask)
    return SampleRequest(positive, TextCondition.empty(), latent_shape=(1, 12, args.frames, args.height, args.width),
                         seed=7, steps=args.steps, cfg=4.5, cache=cache)


@torch.no_grad()
def sample(model, request: SampleRequest, ctx=None) -> dict:
    loop = DenoiseLoop(model, request, ctx=ctx)
    loop.begin()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(loop.num_steps):
        loop.step(i)
    if ctx is not None:
        dist.barrier()  # the run ends when the slower rank is done
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"latent": loop.finish(), "stats": loop.cache_stats, "wall": wall, "cpu": cpu}


def run_all(args, ctx=None) -> list[dict]:
    model = build_model()
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    sample(model, make_request(warm, None), ctx)  # allocator, gloo connections
    return [sample(model, make_request(args, cache), ctx) for cache in CASES]


def rank_main(args) -> list[dict]:
    ctx = ParallelContext(ParallelConfig(2, *LAYOUTS[args.layout], num_heads=DEMO_DIT_CONFIG.num_heads))
    results = run_all(args, ctx)
    ctx.close()
    return results


def label(cache: StepCacheSpec | None) -> str:
    return "no cache" if cache is None else f"{cache.kind.value} {cache.threshold:g}"


def report(title: str, results: list[dict], steps: int, single: list[dict] | None = None) -> None:
    print(f"\n{title}")
    header = (f"{'cache':18} {'computed':>9} {'skipped':>8} {'wall s':>7} {'speedup':>8} {'CPU s':>7} "
              f"{'CPU speedup':>11} {'steps/computed':>14} {'max |diff|':>11} {'mean |diff|':>11}")
    if single is not None:
        header += f" {'same skips as 1 rank':>20} {'max |diff| vs 1 rank':>20}"
    print(header)
    base = results[0]
    for cache, result in zip(CASES, results):
        stats = result["stats"]
        difference = (result["latent"] - base["latent"]).abs()
        line = (f"{label(cache):18} {len(stats.computed):>5}/{steps:<3} {len(stats.skipped):>8} {result['wall']:7.2f} "
                f"{base['wall'] / result['wall']:7.2f}x {result['cpu']:7.2f} {base['cpu'] / result['cpu']:10.2f}x "
                f"{steps / len(stats.computed):13.2f}x "
                f"{difference.max().item():11.2e} {difference.mean().item():11.2e}")
        if single is not None:
            other = single[CASES.index(cache)]
            same = "yes" if other["stats"] == stats else f"NO {stats.skipped} vs {other['stats'].skipped}"
            line += f" {same:>20} {(result['latent'] - other['latent']).abs().max().item():20.2e}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--frames", type=int, default=4, help="latent frames T")
    parser.add_argument("--height", type=int, default=24, help="latent height (video height / 8)")
    parser.add_argument("--width", type=int, default=32, help="latent width (video width / 8)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="cfg2", help="the 2-rank degree mix")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"demo DiT (depth {DEMO_DIT_CONFIG.depth}, width {DEMO_DIT_CONFIG.hidden_size_x}), latent "
          f"[1, 12, {args.frames}, {args.height}, {args.width}] = {tokens} video tokens, {args.steps} steps, cfg 4.5, "
          f"fp32, 1 thread per rank; load average before: {os.getloadavg()[0]:.1f} (2 cores)")
    single = run_all(args)
    report("1 rank", single, args.steps)
    parallel = run_ranks(rank_main, 2, args, timeout_s=600, collective_timeout_s=300)
    busier = [max(rank[i]["cpu"] for rank in parallel) for i in range(len(CASES))]
    two = [{**result, "cpu": cpu} for result, cpu in zip(parallel[0], busier)]
    report(f"2 ranks ({args.layout}, gloo)", two, args.steps, single)
    agree = all(rank[i]["stats"] == parallel[0][i]["stats"] for rank in parallel for i in range(len(CASES)))
    print(f"\nboth ranks skipped the same steps in every run: {'yes' if agree else 'NO'}; "
          f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
