"""Bytes each rank sends per DiT forward, counted at our communication helpers, / theory.

Theory per forward (S video tokens, D = heads x head_dim, L layers, b bytes per element):
Ulysses over N ranks 4(N-1)/N^2 x S x D x L x b (q, k, v there and the output back); Ring over N
ranks 2(N-1)/N x S x D x L x b (K and V blocks). A mix U x R runs Ulysses inside each ring block
(S/R tokens) and the ring on D/U channels: 4(U-1)/U^2 x S/R x D + 2(R-1)/R x S x D/U (x L x b).
Text sends nothing for attention itself.

Counted beyond that theory and printed separately:
- text_gather: with Ulysses each rank holds the text output for H/U heads, all-gathered
  ((U-1) x Lt x D/U x b per layer, Lt text tokens; skipped in the last layer, which drops text);
- sequence_gather: the final 48-channel per-token output gathered once per forward;
- padding: S is padded to a multiple of the sequence degree (ratios use the real S).
CFG sends no activations inside a forward; its one per-step latent all-gather is shown separately.

The default shape is Mochi's example, 49 frames at 848x480 = 14,310 tokens with 256 text tokens, on
a narrow model (4 heads x 4 channels, 2 layers) so that it runs in seconds. Attention bytes scale
exactly with D and L, so their ratio is the full model's. The text gather also scales with D but
runs in L-1 layers, and the sequence gather is 48 channels whatever D and L: so the last column
projects the counted bytes to the full model (D 3072, 48 layers): per-layer counts x layers x
3072/D, plus the sequence gather as counted. Goal: total / theory <= 1.05.

    python bench/comm_bytes.py [--frames 9] [--height 60] [--width 106] [--text-tokens 256]
"""

import argparse
import os

import torch

from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.testing import run_ranks

LAYOUTS = {
    2: {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2), "cfg2": (2, 1, 1)},
    4: {"ulysses4": (1, 4, 1), "ring4": (1, 1, 4), "ulysses2_ring2": (1, 2, 2), "cfg2_ulysses2": (2, 2, 1), "cfg2_ring2": (2, 1, 2)},
}
HEADS, HEAD_DIM, DEPTH = 4, 4, 2


FULL_D, FULL_LAYERS = 3072, 48


def theory(S: int, D: int, layers: int, ulysses: int, ring: int, element_bytes: int) -> float:
    ulysses_part = 4 * (ulysses - 1) / ulysses**2 * (S / ring) * D * layers * element_bytes
    ring_part = 2 * (ring - 1) / ring * S * (D / ulysses) * layers * element_bytes
    return ulysses_part + ring_part


@torch.no_grad()
def rank_main(world: int, args) -> dict:
    width = HEADS * HEAD_DIM
    config = DiTConfig(depth=DEPTH, num_heads=HEADS, head_dim=HEAD_DIM, hidden_size_x=width, hidden_size_y=width,
                       mlp_hidden_x=2 * width, mlp_hidden_y=2 * width, t5_feat_dim=64)
    model = MochiDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=0))
    latent = torch.randn(1, 12, args.frames, args.height, args.width)
    features = torch.randn(1, 256, 64)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, : args.text_tokens] = 1
    sent = {}
    for name, degrees in LAYOUTS[world].items():
        ctx = ParallelContext(ParallelConfig(world, *degrees, num_heads=HEADS))
        pred = model(latent, torch.tensor([0.5]), features, mask, ctx=ctx)
        forward = dict(ctx.sent_bytes)
        ctx.sent_bytes.clear()
        if ctx.cfg_degree == 2:
            ctx.gather_cfg(pred)
        sent[name] = (forward, ctx.sent_bytes["cfg_gather"])
        ctx.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=9, help="latent frames T (49 video frames -> 9)")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    parser.add_argument("--width", type=int, default=106, help="latent width (848 / 8)")
    parser.add_argument("--text-tokens", type=int, default=256)
    args = parser.parse_args()
    S = args.frames * (args.height // 2) * (args.width // 2)
    D, b = HEADS * HEAD_DIM, 4
    print(f"{S} video tokens, {args.text_tokens} text tokens, D = {D}, {DEPTH} layers, fp32 ({b} bytes); "
          f"bytes sent by the busiest rank per forward; load average {os.getloadavg()[0]:.1f}")
    header = (f"{'layout':15} {'ulysses':>9} {'ring':>9} {'text':>8} {'seq out':>8} {'theory':>9} "
              f"{'attn/theory':>11} {'narrow total':>12} {'full-model total/theory':>23} {'cfg/step':>9}")
    print(header)
    for world in LAYOUTS:
        per_rank = run_ranks(rank_main, world, world, args, timeout_s=900, collective_timeout_s=300)
        for name, (cfg, ulysses, ring) in LAYOUTS[world].items():
            busiest = max((r[name][0] for r in per_rank), key=lambda sent: sum(sent.values()))
            cfg_step = max(r[name][1] for r in per_rank)
            attention = busiest.get("ulysses", 0) + busiest.get("ring", 0)
            total = sum(busiest.values())
            expected = theory(S, D, DEPTH, ulysses, ring, b)
            ratio = lambda x: f"{x / expected:.4f}" if expected else "n/a (0)"  # noqa: E731
            widen = FULL_D / D
            full_total = (attention / DEPTH * FULL_LAYERS + busiest.get("text_gather", 0) / (DEPTH - 1)
                          * (FULL_LAYERS - 1)) * widen + busiest.get("sequence_gather", 0)
            full_theory = theory(S, FULL_D, FULL_LAYERS, ulysses, ring, b)
            full = f"{full_total / full_theory:.4f}" if full_theory else "n/a (0)"
            print(f"{name:15} {busiest.get('ulysses', 0):9d} {busiest.get('ring', 0):9d} "
                  f"{busiest.get('text_gather', 0):8d} {busiest.get('sequence_gather', 0):8d} {expected:9.0f} "
                  f"{ratio(attention):>11} {ratio(total):>12} {full:>23} {cfg_step:9d}")


if __name__ == "__main__":
    main()
