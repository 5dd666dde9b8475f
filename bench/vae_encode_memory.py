"""VAE encoder: peak memory at 1x and 4x pixel area (tiled and untiled, each in a fresh subprocess),
and the wall-time speedup of a 2-rank pool's tiled encode over a 1-rank pool's.

Memory is measured as bench/vae_memory.py measures the decoder (its `resident_kib`, VmHWM after
clear_refs, MALLOC_MMAP_THRESHOLD_=131072; see there). The encoder has the real one's structure
(Fourier features, 3 strided downsampling blocks: 8x space, 6x time; causal temporal attention
after the first group; GroupNorm 32) at widths (32, 64, 128, 192) with one ResBlock per group. 1x
is 192x192 px, 4x 384x384 px, both 13 frames; the tiled encode uses 12x12 latent tiles with
overlap 3 at both sizes, so only the tile count and the latent grow with the area (each tile
holds all frames: the encoder's attention spans time).

Speedup: the demo checkpoints (tiny encoder) on a private Ray, `Pool.encode` of the same video and
tile plan on 1 rank and on 2 ranks (1 CPU thread each), median of --repeats; both results are
checked to be equal bit for bit.

    python bench/vae_encode_memory.py [--size 24] [--frames 13] [--tile 12] [--overlap 3] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vae_memory import MMAP_THRESHOLD, resident_kib  # noqa: E402

BENCH_CHANNELS = (32, 64, 128, 192)
BENCH_RES_BLOCKS = (1, 1, 1, 1, 1)


def child(args) -> dict:
    import torch

    from mochi_xdit.mochi.demo import random_vae_encoder_state_dict
    from mochi_xdit.mochi.vae_encoder import MochiVAEEncoder, VAEEncoderConfig
    from mochi_xdit.mochi.vae_encoder_tiling import EncodeTileSpec, encode_tiled, plan_encode_tiles

    torch.set_num_threads(args.threads)
    config = VAEEncoderConfig(channels=BENCH_CHANNELS, num_res_blocks=BENCH_RES_BLOCKS)
    encoder = MochiVAEEncoder(config)
    encoder.load_state_dict(random_vae_encoder_state_dict(config, seed=0))
    encoder.eval()
    side = args.size * args.scale * config.spatial_compression
    video = torch.rand(1, 3, args.frames, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = EncodeTileSpec(args.tile, args.tile, args.overlap) if args.tiled else None
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    before = resident_kib("VmRSS")
    started = time.perf_counter()
    latent = encoder.encode(video) if spec is None else encode_tiled(encoder, video, spec)
    seconds = time.perf_counter() - started
    peak = resident_kib("VmHWM")
    return {
        "encode_peak_mib": (peak - before) / 1024,
        "video_mib": video.numel() * video.element_size() / 2**20,
        "shape": list(latent.shape),
        "tiles": len(plan_encode_tiles(video.shape, spec, config)) if spec else 1,
        "seconds": seconds,
    }


def measure(args, scale: int, tiled: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--scale", str(scale), "--size", str(args.size),
               "--frames", str(args.frames), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--threads", str(args.threads)] + (["--tiled"] if tiled else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {'tiled' if tiled else 'untiled'} {scale}x failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def speedup(args) -> None:
    import torch

    from mochi_xdit.mochi.demo import demo_checkpoints
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.mochi.vae_encoder_tiling import EncodeTileSpec, plan_encode_tiles
    from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_ENCODER_CONFIG
    from mochi_xdit.workers.protocol import PoolSpec
    from mochi_xdit.workers.service import MochiService

    dit, vae = (str(p) for p in demo_checkpoints())
    side = args.size * 2 * DEMO_VAE_ENCODER_CONFIG.spatial_compression
    video = torch.rand(1, 3, args.frames, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = EncodeTileSpec(args.tile * 2, args.tile * 2, args.overlap * 2)
    tiles = len(plan_encode_tiles(video.shape, spec, DEMO_VAE_ENCODER_CONFIG))
    service = MochiService(log=lambda line: None)
    times, latents = {}, {}
    try:
        for world in (1, 2):
            parallel = ParallelConfig(world, 1, world, 1, num_heads=DEMO_DIT_CONFIG.num_heads)
            pool = service.open(PoolSpec(dit, vae, "fp32", parallel, device="cpu", cpu_threads=1))
            pool.encode(video, spec)  # warm-up
            runs = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                latents[world] = pool.encode(video, spec)
                runs.append(time.perf_counter() - started)
            times[world] = statistics.median(runs)
    finally:
        service.shutdown()
    print(f"pool encode {side}x{side} px, {args.frames} frames, {tiles} tiles (demo encoder, 1 CPU thread per rank): "
          f"1 rank {times[1]:.2f} s, 2 ranks {times[2]:.2f} s, speedup {times[1] / times[2]:.2f}x; "
          f"2 ranks == 1 rank bit for bit: {torch.equal(latents[1], latents[2])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=24, help="latent height = width at 1x (4x doubles it)")
    parser.add_argument("--frames", type=int, default=13, help="video frames (6k + 1)")
    parser.add_argument("--tile", type=int, default=12, help="tile side in latent px")
    parser.add_argument("--overlap", type=int, default=3, help="tile overlap in latent px")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed pool encodes per world size")
    parser.add_argument("--skip-speedup", action="store_true", help="memory only (no Ray)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for tiled in (False, True):
        for scale in (1, 2):  # 2x the side = 4x the pixel area
            result = results[tiled, scale] = measure(args, scale, tiled)
            side = args.size * scale * 8
            print(f"{'tiled  ' if tiled else 'untiled'} {4 ** (scale - 1)}x ({side}x{side} px, {args.frames} frames, "
                  f"{result['tiles']} tiles): encode peak {result['encode_peak_mib']:8.1f} MiB "
                  f"(video {result['video_mib']:.1f} MiB) in {result['seconds']:.1f} s")
    for tiled in (False, True):
        ratio = results[tiled, 2]["encode_peak_mib"] / results[tiled, 1]["encode_peak_mib"]
        print(f"{'tiled  ' if tiled else 'untiled'} peak(4x) / peak(1x) = {ratio:.3f}")
    if not args.skip_speedup:
        speedup(args)


if __name__ == "__main__":
    main()
