"""Our single-process DiT forward time / diffusers' MochiTransformer3DModel forward time.

Same random weights, same inputs, same CPU, one thread, fp32, in one run; several repeats each,
interleaved, median reported. The config is compute-bound (a few blocks, a few thousand video
tokens) so the ratio measures the model code, not Python overhead. Goal: ratio <= 0.85.
Both wall time and process CPU time are printed: on a shared machine other processes stretch
wall time at random, while CPU time (one thread) counts only the work this process does, so
the CPU-time ratio is the stable one.

    python bench/dit_vs_diffusers.py [--depth 2] [--heads 12] [--frames 3] [--height 48] [--width 64]
"""

import argparse
import statistics
import time

import torch

import diffusers
from diffusers_keys import genmo_to_diffusers

from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12, help="heads of 64 channels (width = 64 x heads)")
    parser.add_argument("--frames", type=int, default=3, help="latent frames T")
    parser.add_argument("--height", type=int, default=48, help="latent height (video height / 8)")
    parser.add_argument("--width", type=int, default=64, help="latent width (video width / 8)")
    parser.add_argument("--text-tokens", type=int, default=64, help="valid text tokens of 256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    width = 64 * args.heads
    config = DiTConfig(
        depth=args.depth, num_heads=args.heads, head_dim=64, hidden_size_x=width, hidden_size_y=width // 2,
        mlp_hidden_x=(8 * width) // 3, mlp_hidden_y=(8 * (width // 2)) // 3, t5_feat_dim=4096,
    )  # diffusers sizes its MLPs as (8 * dim) // 3
    state = random_dit_state_dict(config, seed=0)
    ours = MochiDiT(config).eval()
    ours.load_state_dict(state)
    theirs = diffusers.MochiTransformer3DModel(
        patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        num_layers=config.depth, pooled_projection_dim=config.hidden_size_y, in_channels=config.in_channels,
        text_embed_dim=config.t5_feat_dim, time_embed_dim=config.timestep_freq_dim,
    ).eval()
    theirs.load_state_dict(genmo_to_diffusers(state, config.depth), strict=True)

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 12, args.frames, args.height, args.width, generator=generator)
    text = torch.randn(1, 256, config.t5_feat_dim, generator=generator)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[0, : args.text_tokens] = 1
    sigma = torch.tensor([0.7])

    def run_ours():
        return ours(latent, sigma, text, mask)

    def run_theirs():
        return theirs(latent, text, (1 - sigma) * 1000, mask, return_dict=False)[0]

    times = {"ours": [], "diffusers": []}
    cpu_times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        error = (run_ours() - run_theirs()).abs().max().item()  # also the warm-up
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
                start, cpu_start = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)

    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"config: depth {config.depth}, width {width} ({config.num_heads} heads x 64), {tokens} video tokens + "
          f"{args.text_tokens} text tokens, fp32, {torch.get_num_threads()} thread(s), {args.repeats} repeats")
    print(f"max abs difference ours vs diffusers: {error:.2e}")
    for label, table in (("wall time", times), ("CPU time", cpu_times)):
        ours_s, theirs_s = statistics.median(table["ours"]), statistics.median(table["diffusers"])
        for name, median in (("ours", ours_s), ("diffusers", theirs_s)):
            runs = ", ".join(f"{t * 1000:.0f}" for t in table[name])
            print(f"{label:9s} {name:9s} median {median * 1000:8.1f} ms  (runs: {runs})")
        print(f"{label:9s} ratio ours / diffusers = {ours_s / theirs_s:.3f}  (goal <= 0.85)")


if __name__ == "__main__":
    main()
