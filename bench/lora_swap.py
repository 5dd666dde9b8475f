"""How long switching LoRAs takes on a live pool, against how long the pool took to start.

A pool (Ray actors, process group, DiT weights) is started twice: the first start includes starting
Ray itself, the second is a rebuild on a running Ray (what a changed loader setting costs). Then,
on the live pool, every rank runs `RankWorker.set_loras` for: apply (base -> LoRA A), swap (A -> B,
a file in the other format), strength change (B at another strength: nothing re-read), stack (A + B),
remove (-> base), and a repeat of the same tuple (a no-op). Each is timed from the driver, so it
includes the actor round trip. A short sampling run with and without a LoRA checks that the pool
still computes, and that removing the LoRA gives the base latent bit for bit.

Prints each switch's time and its ratio to the warm pool start (the smaller, stricter denominator).
Goal (DESIGN.md section 8): LoRA apply / swap / remove <= 0.1 x pool start.

    python bench/lora_swap.py [--world 2] [--depth 8] [--width 512] [--rank 32]
"""

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig
from mochi_xdit.mochi.lora_files import LoraSpec, linear_shapes_for
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.sampler import SampleRequest
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.workers.pool import Pool
from mochi_xdit.workers.protocol import PoolSpec
from mochi_xdit.workers.service import MochiService

LATENT_SHAPE = (1, 12, 2, 8, 8)


def set_loras_on_pool(pool: Pool, specs: tuple[LoraSpec, ...]) -> None:
    """Every rank runs set_loras(specs), waited for like any pool verb."""
    pool.set_loras(specs)


def write_genmo_lora(path: str, config: DiTConfig, rank: int) -> None:
    """genmo trainer layout: attention qkv / proj pairs, bare .lora_A / .lora_B, kwargs metadata."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (out_features, in_features) in linear_shapes_for(config).items():
        if ".attn." in module:
            tensors[f"{module}.lora_A"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{module}.lora_B"] = 0.1 * torch.randn(out_features, rank, generator=generator) / rank**0.5
    kwargs = {"qkv_proj_lora_rank": rank, "qkv_proj_lora_alpha": rank, "out_proj_lora_rank": rank,
              "out_proj_lora_alpha": rank}
    save_file(tensors, path, metadata={"kwargs": json.dumps(kwargs)})


def write_diffusers_lora(path: str, config: DiTConfig, rank: int) -> None:
    """diffusers / PEFT layout on split q / k / v, attention outputs and the visual feed-forward."""
    generator = torch.Generator().manual_seed(2)
    inner, width = config.inner_dim, config.hidden_size_x
    tensors = {}
    for i in range(config.depth):
        for name, (out_features, in_features) in {
            "attn1.to_q": (inner, width), "attn1.to_k": (inner, width), "attn1.to_v": (inner, width),
            "attn1.to_out.0": (width, inner), "ff.net.0.proj": (2 * config.mlp_hidden_x, width),
            "ff.net.2": (width, config.mlp_hidden_x),
        }.items():
            key = f"transformer.transformer_blocks.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = 0.1 * torch.randn(out_features, rank, generator=generator) / rank**0.5
    save_file(tensors, path)


def timed(label: str, action) -> tuple[str, float]:
    start = time.perf_counter()
    action()
    return label, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (Ulysses degree)")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=512, help="visual width (heads of 64)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    args = parser.parse_args()
    torch.set_num_threads(1)

    heads = args.width // 64
    config = DiTConfig(depth=args.depth, num_heads=heads, head_dim=64, hidden_size_x=args.width,
                       hidden_size_y=args.width // 2, mlp_hidden_x=(8 * args.width) // 3,
                       mlp_hidden_y=(4 * args.width) // 3, t5_feat_dim=4096)
    folder = tempfile.mkdtemp(prefix="mochi_xdit_lora_bench_")
    dit_path, lora_a, lora_b = (os.path.join(folder, name) for name in
                                ("dit.safetensors", "genmo_lora.safetensors", "diffusers_lora.safetensors"))
    save_file(random_dit_state_dict(config, seed=0), dit_path)
    write_genmo_lora(lora_a, config, args.rank)
    write_diffusers_lora(lora_b, config, args.rank)
    spec = PoolSpec(dit_path, None, "fp32", ParallelConfig(args.world, ulysses_degree=args.world, num_heads=heads),
                    device="cpu", cpu_threads=1)
    generator = torch.Generator().manual_seed(0)
    request = SampleRequest(TextCondition(torch.randn(1, 256, 4096, generator=generator),
                                          torch.tensor([[1] * 20 + [0] * 236])),
                            TextCondition.empty(256), latent_shape=LATENT_SHAPE, seed=1, steps=2, cfg=4.5)

    service = MochiService(log=lambda line: None)
    try:
        start = time.perf_counter()
        service.pool(spec)  # Ray and the pool from nothing
        cold_start = time.perf_counter() - start
        service.release_pool("measuring a start with Ray already up")
        start = time.perf_counter()
        pool = service.pool(spec)
        warm_start = time.perf_counter() - start
        try:
            base = pool.sample(request)
            a, b = LoraSpec(lora_a, 1.0), LoraSpec(lora_b, 1.0)
            switches = [
                timed("apply A (genmo file)", lambda: set_loras_on_pool(pool, (a,))),
                timed("swap A -> B (diffusers file)", lambda: set_loras_on_pool(pool, (b,))),
                timed("strength of B 1.0 -> 0.5", lambda: set_loras_on_pool(pool, (LoraSpec(lora_b, 0.5),))),
                timed("stack A + B", lambda: set_loras_on_pool(pool, (a, b))),
                timed("same again (no-op)", lambda: set_loras_on_pool(pool, (a, b))),
            ]
            with_lora = pool.sample(request, loras=(a, b))  # a run with the stack (already active: no-op)
            switches.append(timed("remove (base model)", lambda: set_loras_on_pool(pool, ())))
            back = pool.sample(request)  # no LoRAs asked for: the base model
        finally:
            pool.shutdown()
    finally:
        service.shutdown()

    assert (with_lora - base).abs().max().item() > 1e-4, "the LoRAs did not change the output"
    assert torch.equal(back, base), "removing the LoRAs did not restore the base output bit for bit"
    size_mb = sum(os.path.getsize(p) for p in (lora_a, lora_b)) / 2**20
    dit_mb = os.path.getsize(dit_path) / 2**20
    print(f"model: depth {config.depth}, width {config.hidden_size_x}, {dit_mb:.0f} MB fp32; LoRAs rank {args.rank}, "
          f"{size_mb:.1f} MB together; {args.world} ranks (ulysses) x 1 thread, CPU")
    print(f"pool start: {cold_start:.2f} s with Ray start, {warm_start:.2f} s on a running Ray (the denominator)")
    worst = 0.0
    for label, seconds in switches:
        ratio = seconds / warm_start
        worst = max(worst, ratio)
        print(f"  {label:<30} {seconds * 1e3:8.1f} ms   ratio {ratio:.4f}")
    print(f"worst switch / pool start: {worst:.4f}   goal <= 0.1")
    print("with LoRAs the latent differs from the base; after removal it equals the base bit for bit")
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
