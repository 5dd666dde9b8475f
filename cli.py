"""`mochi-xdit generate`: text to mp4 on a pool of ranks, outside ComfyUI.

    mochi-xdit generate --prompt "a red fox running through snow" --world-size 2 --output fox.mp4

Steps: check every input (no Ray yet), encode the prompts with T5 in this process, start the
pool (a private Ray on 127.0.0.1, or --ray-address), sample with a progress bar, decode the tiles
across the ranks, write an H.264 mp4 with PyAV. Without --dit/--vae/--t5 it runs the built-in
demo model (tiny random weights: the video is noise) and says so.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

SCHEDULES = ("linear_quadratic", "simple")
DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8")
# Defaults: the real model (genmo's 848x480, 64 steps) and a demo run that takes seconds.
REAL_DEFAULTS = {"width": 848, "height": 480, "frames": 31, "steps": 64}
DEMO_DEFAULTS = {"width": 128, "height": 96, "frames": 13, "steps": 8}


class InputError(ValueError):
    """A command-line input that cannot work; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mochi-xdit", description="Mochi-1 text-to-video on many ranks (Ray).")
    commands = parser.add_subparsers(dest="command", required=True)
    planner = commands.add_parser(
        "plan", add_help=False,
        help="will it fit? per-rank memory, FLOPs and traffic of every degree mix (mochi-xdit plan --help)",
    )
    planner.add_argument("rest", nargs=argparse.REMAINDER)
    gen = commands.add_parser("generate", help="generate one video and write it as mp4",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    text = gen.add_argument_group("prompt")
    text.add_argument("--prompt", required=True, help="what the video shows")
    text.add_argument("--negative-prompt", default="", help="what to steer away from (empty: none, genmo's default)")
    video = gen.add_argument_group("video")
    video.add_argument("--width", type=int, help="pixels, multiple of 16 (default 848; demo 128)")
    video.add_argument("--height", type=int, help="pixels, multiple of 16 (default 480; demo 96)")
    video.add_argument("--frames", type=int, help="6k+1 frames, e.g. 31, 85, 163 (default 31; demo 13)")
    video.add_argument("--fps", type=int, default=30, help="frames per second of the mp4 (Mochi: 30)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, help="Euler steps (default 64; demo 8)")
    sampling.add_argument("--cfg", type=float, default=4.5, help="guidance scale; 1 skips the negative prompt")
    sampling.add_argument("--seed", type=int, default=0, help="noise seed (ComfyUI's convention)")
    sampling.add_argument("--schedule", choices=SCHEDULES, default="linear_quadratic",
                          help="sigma schedule: genmo's linear_quadratic, or ComfyUI's simple (shift 6)")
    ranks = gen.add_argument_group("ranks")
    ranks.add_argument("--world-size", type=int, default=1, help="number of ranks (one GPU each, or CPU threads)")
    ranks.add_argument("--ulysses", default="auto", help="Ulysses degree (divides the heads) or auto")
    ranks.add_argument("--ring", default="auto", help="Ring degree or auto")
    ranks.add_argument("--cfg-parallel", default="auto", help="CFG degree (1 or 2) or auto")
    ranks.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda when this machine has a GPU, else cpu (say cuda for a GPU cluster)")
    ranks.add_argument("--cpu-threads", type=int, default=1, help="torch threads per CPU rank")
    ranks.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (else RAY_ADDRESS, else a private Ray on 127.0.0.1)")
    weights = gen.add_argument_group("weights (all omitted: the built-in demo model)")
    weights.add_argument("--dit", help="Mochi DiT .safetensors (genmo dit.safetensors or mochi_preview_bf16)")
    weights.add_argument("--vae", help="Mochi VAE .safetensors (mochi_vae.safetensors or genmo decoder)")
    weights.add_argument("--t5", help="T5-XXL: a Hugging Face directory, or a single .safetensors file")
    weights.add_argument("--t5-tokenizer", help="tokenizer directory (needed with a single T5 file)")
    weights.add_argument("--dtype", choices=DTYPES, default="auto", help="DiT weights; auto: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--output", default="mochi.mp4", help="mp4 file to write")
    return parser


@dataclass(frozen=True)
class Plan:
    """Checked inputs: everything needed to run, decided before any actor starts."""

    demo: bool
    dit_path: str
    vae_path: str
    t5_path: str | None  # None: the demo T5
    t5_tokenizer: str | None
    parallel: object  # ParallelConfig
    device: str
    weight_dtype: str
    latent_shape: tuple[int, ...]
    output: str


def _degree(name: str, value: str) -> int | None:
    if str(value).lower() == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"--{name}={value!r}: give a positive integer or 'auto'") from None
    if number < 1:
        raise InputError(f"--{name}={number}: degrees are positive integers (or 'auto')")
    return number


def _parallel_config(args, num_heads: int, num_tokens: int, use_cfg: bool):
    from .mochi.parallel.config import ParallelConfig, auto

    if args.world_size < 1:
        raise InputError(f"--world-size={args.world_size}: need at least 1 rank")
    degrees = {name: _degree(name, getattr(args, attr)) for name, attr in
               (("ulysses", "ulysses"), ("ring", "ring"), ("cfg-parallel", "cfg_parallel"))}
    if all(value is None for value in degrees.values()):
        return auto(args.world_size, num_heads, num_tokens, use_cfg)
    cfg = degrees["cfg-parallel"] or 1
    sp = max(1, args.world_size // cfg)  # a world not divisible by cfg is rejected by ParallelConfig
    ulysses, ring = degrees["ulysses"], degrees["ring"]
    if ulysses is None and ring is None:
        ulysses = max(d for d in range(1, sp + 1) if sp % d == 0 and num_heads % d == 0)
    if ulysses is None:
        ulysses = max(1, sp // ring)
    if ring is None:
        ring = max(1, sp // ulysses)
    config = ParallelConfig(args.world_size, cfg, ulysses, ring, num_heads=num_heads)
    if config.cfg_degree == 2 and not use_cfg:
        raise InputError("--cfg-parallel 2 needs a cfg above 1 (with --cfg 1 there is no negative branch); "
                         "use --cfg-parallel 1 and put the ranks on --ulysses or --ring")
    return config


def _planned_parallel_config(args, parallel, device: str, weight_dtype: str):
    """All degrees `auto` on a local GPU: the planner's fastest mix that fits this GPU for this video
    (counted on fake tensors from our own DiT code, a few seconds). CPU ranks and clusters (GPU model
    unknown here) keep the plain `auto` layout."""
    import torch

    degrees = (args.ulysses, args.ring, args.cfg_parallel)
    if any(str(value).lower() != "auto" for value in degrees):
        return parallel
    if device != "cuda" or not torch.cuda.is_available() or args.ray_address or weight_dtype not in ("bf16", "fp8"):
        return parallel
    from .mochi.checkpoint import inspect_checkpoint
    from .mochi.dit import DiTConfig
    from .mochi.planner.hardware import gpu_from_device_name
    from .mochi.planner.plan import recommend

    info = inspect_checkpoint(args.dit)
    shapes = {name[len(info.dit_prefix):]: t.shape for name, t in info.tensors.items() if name.startswith(info.dit_prefix)}
    gpu = gpu_from_device_name(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
    return recommend(args.world_size, args.width, args.height, args.frames, gpu=gpu, weight_dtype=weight_dtype,
                     steps=args.steps, use_cfg=args.cfg != 1.0, config=DiTConfig.from_shapes(shapes))


def _check_output(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise InputError(f"--output {path} is a directory; give a file name ending in .mp4")
    if not path.lower().endswith(".mp4"):
        raise InputError(f"--output {path}: the video is written as mp4; give a path ending in .mp4")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"--output {path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InputError(f"--output {path}: cannot write there (permissions); choose a writable path")
    return path


def _dit_heads(path: str) -> int:
    from .mochi.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except (CheckpointError, OSError) as error:
        raise InputError(f"--dit {path}: {error}") from None
    if info.kind != "dit":
        raise InputError(f"--dit {path} looks like {info.describe()}; give the Mochi DiT file "
                         "(e.g. mochi_preview_bf16.safetensors)")
    return info.tensors[f"{info.dit_prefix}pos_frequencies"].shape[1]


def _check_vae(path: str) -> None:
    from .mochi.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except (CheckpointError, OSError) as error:
        raise InputError(f"--vae {path}: {error}") from None
    if info.kind != "vae" or info.vae_decoder_prefix is None:
        raise InputError(f"--vae {path} looks like {info.describe()}; give Mochi's VAE with its decoder "
                         "(e.g. mochi_vae.safetensors)")


def plan_run(args) -> Plan:
    """Check every input without starting anything; raise InputError saying what to change."""
    from .mochi.constants import PATCH_SIZE
    from .mochi.sampler import latent_shape_for_video

    given = [name for name in ("dit", "vae", "t5") if getattr(args, name)]
    demo = not given
    if given and len(given) != 3:
        missing = sorted({"dit", "vae", "t5"} - set(given))
        raise InputError(f"give all of --dit, --vae and --t5 (missing: {', '.join('--' + m for m in missing)}), "
                         "or none of them for the built-in demo model")
    defaults = DEMO_DEFAULTS if demo else REAL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1:
        raise InputError(f"--steps={args.steps}: need at least 1 step")
    if args.cfg < 0:
        raise InputError(f"--cfg={args.cfg}: use a scale >= 0 (1 disables guidance; Mochi's default is 4.5)")
    if args.fps < 1:
        raise InputError(f"--fps={args.fps}: need at least 1 frame per second")
    if args.cpu_threads < 1:
        raise InputError(f"--cpu-threads={args.cpu_threads}: need at least 1 thread per rank")
    if not 0 <= args.seed < 2**64:
        raise InputError(f"--seed={args.seed}: use an integer in [0, 2**64)")
    try:
        latent_shape = latent_shape_for_video(args.width, args.height, args.frames)
    except ValueError as error:
        raise InputError(str(error).replace("frames=", "--frames=").replace("width=", "--width=")
                         .replace("height=", "--height=")) from None
    output = _check_output(args.output)
    if demo:
        from .mochi.demo import DEMO_DIT_CONFIG, demo_checkpoints

        num_heads = DEMO_DIT_CONFIG.num_heads
        dit_path = vae_path = ""  # written after the checks
    else:
        for name in ("dit", "vae"):
            path = getattr(args, name)
            if not os.path.isfile(path):
                raise InputError(f"--{name} {path}: no such file; give the path of the .safetensors file")
        if not os.path.exists(args.t5):
            raise InputError(f"--t5 {args.t5}: no such file or directory; give a T5-XXL directory or .safetensors file")
        if os.path.isfile(args.t5) and not args.t5_tokenizer:
            raise InputError(f"--t5 {args.t5} is a single file; also give --t5-tokenizer (a T5 tokenizer directory)")
        if args.t5_tokenizer and not os.path.isdir(args.t5_tokenizer):
            raise InputError(f"--t5-tokenizer {args.t5_tokenizer}: not a directory; give the tokenizer's folder")
        num_heads = _dit_heads(args.dit)
        _check_vae(args.vae)
        dit_path, vae_path = os.path.abspath(args.dit), os.path.abspath(args.vae)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    weight_dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    num_tokens = latent_shape[2] * (latent_shape[3] // PATCH_SIZE) * (latent_shape[4] // PATCH_SIZE)
    try:
        parallel = _parallel_config(args, num_heads, num_tokens, use_cfg=args.cfg != 1.0)
    except ValueError as error:
        raise InputError(str(error)) from None
    if not demo:
        parallel = _planned_parallel_config(args, parallel, device, weight_dtype)
    if demo:
        dit_path, vae_path = (str(p) for p in demo_checkpoints())
    return Plan(demo, dit_path, vae_path, None if demo else args.t5, args.t5_tokenizer, parallel, device,
                weight_dtype, latent_shape, output)


def encode_prompts(plan: Plan, prompt: str, negative: str):
    """(positive, negative) TextConditions from T5 in this process; the encoder is freed afterwards."""
    import torch

    from .mochi.text_encoder import demo_text_encoder, load_text_encoder

    if plan.demo:
        from .mochi.demo import demo_dir

        encoder = demo_text_encoder(str(demo_dir()))
    else:
        cuda = plan.device == "cuda" and torch.cuda.is_available()
        encoder = load_text_encoder(plan.t5_path, plan.t5_tokenizer, torch.bfloat16 if cuda else torch.float32,
                                    "cuda" if cuda else "cpu")
    positive, negative_condition = encoder.encode(prompt), encoder.encode(negative)
    del encoder
    return positive, negative_condition


def write_mp4(video, path: str, fps: int) -> None:
    """video [3, F, H, W] in [-1, 1] -> H.264 mp4 (yuv420p)."""
    import av
    import torch

    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, F, H, W]
    frames = frames.permute(1, 2, 3, 0).contiguous().numpy()  # [F, H, W, 3]
    F, H, W, _ = frames.shape
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def run(args) -> int:
    from tqdm import tqdm

    from .mochi.sampler import SampleRequest
    from .workers.pool import Pool
    from .workers.protocol import PoolSpec, Timeouts
    from .workers.ray_runtime import shutdown_ray

    plan = plan_run(args)
    if plan.demo:
        from .mochi.demo import DEMO_NOTICE

        bar = "!" * 78
        print(f"{bar}\n!!! {DEMO_NOTICE}\n{bar}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    spec = PoolSpec(plan.dit_path, plan.vae_path, plan.weight_dtype, plan.parallel, device=plan.device,
                    cpu_threads=args.cpu_threads, ray_address=args.ray_address, timeouts=Timeouts())
    p = plan.parallel
    print(f"starting {p.world_size} rank(s) on {plan.device} (cfg {p.cfg_degree} x ulysses {p.ulysses_degree} x "
          f"ring {p.ring_degree}), {plan.weight_dtype} weights", file=sys.stderr, flush=True)
    pool = None
    try:
        if plan.device == "cpu":  # encode while the ranks start (on GPU, T5 first: it needs GPU memory)
            with ThreadPoolExecutor(max_workers=1) as background:
                encoded = background.submit(encode_prompts, plan, args.prompt, args.negative_prompt)
                try:
                    pool = Pool(spec)
                finally:
                    positive, negative = encoded.result()
        else:
            positive, negative = encode_prompts(plan, args.prompt, args.negative_prompt)
            pool = Pool(spec)
        request = SampleRequest(positive, negative, latent_shape=plan.latent_shape, seed=args.seed,
                                steps=args.steps, cfg=args.cfg, schedule=args.schedule)
        with tqdm(total=request.steps, desc="sampling", unit="step", file=sys.stderr) as progress:
            latent = pool.sample(request, on_step=lambda report: progress.update(1))
        print("decoding (tiles spread over the ranks)", file=sys.stderr, flush=True)
        video = pool.decode(latent)  # [1, 3, F, H, W]
    finally:
        if pool is not None:
            pool.shutdown()
        shutdown_ray()
    write_mp4(video[0], plan.output, args.fps)
    _, _, F, H, W = video.shape
    print(f"wrote {plan.output}: {F} frames, {W}x{H}, {args.fps} fps, in {time.perf_counter() - started:.1f} s"
          + (" (DEMO model: noise)" if plan.demo else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # the planner parses its own options
        from .mochi.planner import plan_main

        return plan_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as error:
        parser.exit(2, f"mochi-xdit: error: {error}\n")
    except KeyboardInterrupt:
        print("interrupted; every rank was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
