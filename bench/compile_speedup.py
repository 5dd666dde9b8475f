"""torch.compile of the DiT's regions between collectives (`DiTCompile.ON`) against eager, one rank,
the demo-size DiT: how long the first compiled forward takes (compile time), the steady forward
time both ways, the speedup, and the largest difference of the outputs.

The first compiled forward traces and builds every region (two per block kind: before and after
attention, for the blocks that update the text and the last one); later forwards of any token count
reuse them. Inductor caches its builds on disk (TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_$USER), so a second run of this script measures a warm compile unless --cold
points the cache at a fresh folder. CPU time (this process only: Inductor builds its C++ in worker
processes) is printed beside wall time because the machine may be shared. On CPU the fp32
elementwise work is a small share of a forward (the matmuls dominate), so
the speedup here says little about a GPU, where the unfused norms, RoPE and gates cost 15-25 % of a
block; `bench/gpu_acceptance.py` measures that.

    python bench/compile_speedup.py [--frames 4] [--height 24] [--width 32] [--runs 5] [--threads 1] [--cold]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="latent frames")
    parser.add_argument("--height", type=int, default=24, help="latent height")
    parser.add_argument("--width", type=int, default=32, help="latent width")
    parser.add_argument("--text", type=int, default=32, help="valid prompt tokens")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards each way (the median counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cold", action="store_true", help="compile into a fresh Inductor cache folder")
    args = parser.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mochi_inductor_")
    torch.set_num_threads(args.threads)

    from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
    from mochi_xdit.mochi.dit import DiTCompile, MochiDiT

    def build(compile: DiTCompile) -> MochiDiT:
        with torch.device("meta"):
            model = MochiDiT(DEMO_DIT_CONFIG, compile=compile)
        model.load_state_dict(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), assign=True)
        return model.eval()

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 12, args.frames, args.height, args.width, generator=generator)
    features = torch.randn(1, 256, DEMO_DIT_CONFIG.t5_feat_dim, generator=generator)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, : args.text] = 1
    inputs = (latent, torch.tensor([0.7]), features, mask)
    eager, compiled = build(DiTCompile.OFF), build(DiTCompile.ON)

    with torch.no_grad():
        first_eager_wall, _, expected = timed(lambda: eager(*inputs))
        compile_wall, compile_cpu, got = timed(lambda: compiled(*inputs))
        eager_runs = [timed(lambda: eager(*inputs))[:2] for _ in range(args.runs)]
        compiled_runs = [timed(lambda: compiled(*inputs))[:2] for _ in range(args.runs)]
    eager_s = statistics.median(wall for wall, _ in eager_runs)
    compiled_s = statistics.median(wall for wall, _ in compiled_runs)
    tokens = args.frames * args.height * args.width // 4
    figures = {
        "video_tokens": tokens,
        "text_tokens": args.text,
        "threads": args.threads,
        "cold_cache": args.cold,
        "first_compiled_forward_s": round(compile_wall, 2),
        "first_compiled_forward_cpu_s": round(compile_cpu, 2),
        "compile_s": round(compile_wall - first_eager_wall, 2),
        "eager_forward_s": round(eager_s, 4),
        "compiled_forward_s": round(compiled_s, 4),
        "eager_forward_cpu_s": round(statistics.median(cpu for _, cpu in eager_runs), 4),
        "compiled_forward_cpu_s": round(statistics.median(cpu for _, cpu in compiled_runs), 4),
        "speedup": round(eager_s / compiled_s, 3),
        "max_abs_difference": (got - expected).abs().max().item(),
    }
    print(f"demo DiT, {tokens} video + {args.text} text tokens, fp32 CPU, {args.threads} thread(s), "
          f"{'cold' if args.cold else 'warm or cold'} Inductor cache")
    print(f"  first compiled forward {compile_wall:.1f} s (compile ~{compile_wall - first_eager_wall:.1f} s); "
          f"forward eager {eager_s * 1e3:.1f} ms, compiled {compiled_s * 1e3:.1f} ms: {eager_s / compiled_s:.2f}x; "
          f"max |compiled - eager| {figures['max_abs_difference']:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
