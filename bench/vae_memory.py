"""Peak memory of a VAE decode at 1x and 4x pixel area, tiled and untiled, each measured in a
fresh subprocess.

Each measurement runs in its own `python bench/vae_memory.py --child ...` process: it builds the
decoder and the latent, resets the kernel's resident-set high-water mark (writing 5 to
/proc/self/clear_refs, Linux >= 4.0), decodes, and reports VmHWM minus the resident set just
before the decode: the decode's own peak (activations, conv workspaces, the output video), with
the interpreter, torch and the weights excluded. Without clear_refs it falls back to
getrusage's ru_maxrss (then the setup's own peak can hide a smaller decode peak).

The children run with MALLOC_MMAP_THRESHOLD_=131072, so glibc serves every block above 128 KiB
with its own mmap and returns it on free: the resident set then follows the tensors the decode
holds. With glibc's default (a threshold that grows to 32 MiB as big blocks are freed) freed
tensors stay cached in the heap, and the resident peak also counts that cache, which grows with
the number of tiles; `--glibc-default` measures that way.

The decoder has the real one's structure (3 upsampling blocks: 8x space, 6x time; causal 3x3x3
convs; GroupNorm 32) at widths (32, 64, 128, 192) and one ResBlock per block, so activations
dominate its 22 MB of weights and a run takes minutes on 2 CPU cores. 1x is a 24x24 latent
(192x192 px), 4x is 48x48 (384x384 px), both 2 latent frames (7 video frames). The tiled decode
uses 12x12 latent tiles with overlap 3 and 1-frame chunks at both sizes, so only the tile count
and the assembled output grow with the area. Goal: tiled peak(4x) / peak(1x) <= 1.15.

    python bench/vae_memory.py [--size 24] [--frames 2] [--tile 12] [--overlap 3] [--chunk 1]
                               [--glibc-default]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BENCH_CHANNELS = (32, 64, 128, 192)
BENCH_RES_BLOCKS = (1, 1, 1, 1, 1)
MMAP_THRESHOLD = 128 * 1024  # bytes; see the module docstring


def resident_kib(field: str) -> int | None:
    """A VmRSS / VmHWM line of /proc/self/status in KiB, or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def child(args) -> dict:
    import torch

    from mochi_xdit.mochi.demo import random_vae_state_dict
    from mochi_xdit.mochi.vae import MochiVAEDecoder, VAEDecoderConfig
    from mochi_xdit.mochi.vae_tiling import TileSpec, decode_tiled, plan_tiles

    torch.set_num_threads(args.threads)
    config = VAEDecoderConfig(channels=BENCH_CHANNELS, num_res_blocks=BENCH_RES_BLOCKS)
    decoder = MochiVAEDecoder(config)
    decoder.load_state_dict(random_vae_state_dict(config, seed=0))
    decoder.eval()
    side = args.size * args.scale
    latent = torch.randn(1, config.latent_channels, args.frames, side, side, generator=torch.Generator().manual_seed(0))
    spec = TileSpec(args.tile, args.tile, args.overlap, args.chunk) if args.tiled else None
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters())

    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current resident set
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    before = resident_kib("VmRSS")
    started = time.perf_counter()
    video = decoder.decode(latent) if spec is None else decode_tiled(decoder, latent, spec)
    seconds = time.perf_counter() - started
    peak = resident_kib("VmHWM") if method != "ru_maxrss" else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "decode_peak_mib": (peak - before) / 1024,
        "process_peak_mib": peak / 1024,
        "weights_mib": weights / 2**20,
        "output_mib": video.numel() * video.element_size() / 2**20,
        "shape": list(video.shape),
        "tiles": len(plan_tiles(latent.shape, spec)) if spec else 1,
        "seconds": seconds,
        "method": method,
    }


def measure(args, scale: int, tiled: bool) -> dict:
    command = [
        sys.executable, os.path.abspath(__file__), "--child", "--scale", str(scale),
        "--size", str(args.size), "--frames", str(args.frames), "--tile", str(args.tile),
        "--overlap", str(args.overlap), "--chunk", str(args.chunk), "--threads", str(args.threads),
    ] + (["--tiled"] if tiled else [])
    env = dict(os.environ)
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {'tiled' if tiled else 'untiled'} {scale}x failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=24, help="latent height = width at 1x (4x doubles it)")
    parser.add_argument("--frames", type=int, default=2, help="latent frames T (6T - 5 video frames)")
    parser.add_argument("--tile", type=int, default=12, help="tile side in latent px")
    parser.add_argument("--overlap", type=int, default=3, help="tile overlap in latent px")
    parser.add_argument("--chunk", type=int, default=1, help="latent frames per temporal chunk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's adaptive mmap threshold")
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
            result = measure(args, scale, tiled)
            results[tiled, scale] = result
            side = args.size * scale * 8
            kind = "tiled  " if tiled else "untiled"
            print(
                f"{kind} {4 ** (scale - 1)}x ({side}x{side} px, {result['shape'][2]} frames, {result['tiles']} tiles): "
                f"decode peak {result['decode_peak_mib']:8.1f} MiB "
                f"(process {result['process_peak_mib']:.0f} MiB, output {result['output_mib']:.1f} MiB, "
                f"weights {result['weights_mib']:.1f} MiB) in {result['seconds']:.1f} s"
            )
    untiled = results[False, 2]["decode_peak_mib"] / results[False, 1]["decode_peak_mib"]
    tiled = results[True, 2]["decode_peak_mib"] / results[True, 1]["decode_peak_mib"]
    allocator = "glibc default" if args.glibc_default else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    print(f"measured with {results[True, 1]['method']}, {allocator}")
    print(f"untiled peak(4x) / peak(1x) = {untiled:.3f}")
    print(f"tiled   peak(4x) / peak(1x) = {tiled:.3f}   (goal <= 1.15)")


if __name__ == "__main__":
    main()
