"""`mochi-xdit generate`: text (or a video and text) to mp4 on a pool of ranks, outside ComfyUI.

    mochi-xdit generate --prompt "a red fox running through snow" --world-size 2 --output fox.mp4
    mochi-xdit generate --prompt "a red fox in autumn" --input-video fox.mp4 --denoise 0.6 --output autumn.mp4

Steps: check every input (no Ray yet), encode the prompts with T5 in this process, start the
pool (a private Ray on 127.0.0.1, or --ray-address), sample with a progress bar, decode the tiles
across the ranks, write an H.264 mp4 with PyAV. With --input-video the video is read with PyAV,
encoded in tiles across the ranks and re-noised to --denoise before sampling (`input_video.py`). Without --dit/--vae/--t5 it runs the built-in
demo model (tiny random weights: the video is noise) and says so.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Defaults: the real model (genmo's 848x480, 64 steps) and a demo run that takes seconds.
REAL_DEFAULTS = {"width": 848, "height": 480, "frames": 31, "steps": 64}
DEMO_DEFAULTS = {"width": 128, "height": 96, "frames": 13, "steps": 8}
# How the resolver's fields are called on this command line.
FLAGS = {"dit": "--dit", "vae": "--vae", "weight_dtype": "--dtype", "device": "--device",
         "world_size": "--world-size", "degrees": "degrees (--ulysses/--ring/--cfg-parallel)",
         "cpu_threads": "--cpu-threads", "ray_address": "--ray-address", "attention_backend": "--attention",
         "lora": "--lora", "cache": "--cache"}


class InputError(ValueError):
    """A command-line input that cannot work; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    from .workers.choices import ATTENTION_CHOICES, DEVICE_CHOICES, SCHEDULE_CHOICES, WEIGHT_DTYPE_CHOICES

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
    video.add_argument("--fps", type=int, default=None, help="frames per second of the mp4 (default 30, or the input "
                       "video's)")
    video.add_argument("--input-video", default=None,
                       help="video-to-video: encode this file (PyAV) and denoise it with the prompt; its size is "
                            "used (multiples of 16) and its first 6k+1 frames (all that fit, or --frames)")
    video.add_argument("--denoise", type=float, default=None,
                       help="with --input-video: how much to change it, in (0, 1] (default 0.6; 1 ignores it)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, help="Euler steps (default 64; demo 8)")
    sampling.add_argument("--cfg", type=float, default=4.5, help="guidance scale; 1 skips the negative prompt")
    sampling.add_argument("--cfg-schedule", default=None, metavar="SCALE*STEPS,...",
                          help="one cfg per step instead of --cfg, e.g. \"4.5*40,1*24\" (genmo's cfg_schedule); "
                               "steps at 1 skip the negative prompt")
    sampling.add_argument("--seed", type=int, default=0, help="noise seed (ComfyUI's convention)")
    sampling.add_argument("--schedule", choices=SCHEDULE_CHOICES, default="linear_quadratic",
                          help="sigma schedule: genmo's linear_quadratic, or ComfyUI's simple (shift 6)")
    sampling.add_argument("--cache", choices=("off", "teacache", "first_block"), default="off",
                          help="step caching: skip the blocks on steps whose input barely changes (all ranks agree)")
    sampling.add_argument("--cache-threshold", type=float, default=None,
                          help="how much change a skipped step may hide (default 0.06; TeaCache published 1.5x at "
                               "0.06, 2.1x at 0.09); 0 never skips")
    sampling.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                          help="a Mochi LoRA .safetensors (genmo, ComfyUI/kohya or diffusers format), strength "
                               "default 1; repeat to stack")
    ranks = gen.add_argument_group("ranks")
    ranks.add_argument("--world-size", type=int, default=1, help="number of ranks (one GPU each, or CPU threads)")
    ranks.add_argument("--ulysses", default="auto", help="Ulysses degree (divides the heads) or auto")
    ranks.add_argument("--ring", default="auto", help="Ring degree or auto")
    ranks.add_argument("--cfg-parallel", default="auto", help="CFG degree (1 or 2) or auto")
    ranks.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                       help="auto: cuda when this machine has a GPU, else cpu (say cuda for a GPU cluster)")
    ranks.add_argument("--cpu-threads", type=int, default=1, help="torch threads per CPU rank")
    ranks.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                       help="attention kernel: auto (fastest installed), torch (PyTorch's fused kernels), flash_attn, "
                            "flash_attn_3 (Hopper) or xfuser (xDiT's USP layer; CUDA, 2+ ranks)")
    ranks.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (else RAY_ADDRESS, else a private Ray on 127.0.0.1)")
    weights = gen.add_argument_group("weights (all omitted: the built-in demo model)")
    weights.add_argument("--dit", help="Mochi DiT .safetensors (genmo dit.safetensors or mochi_preview_bf16)")
    weights.add_argument("--vae", help="Mochi VAE .safetensors (mochi_vae.safetensors or genmo decoder)")
    weights.add_argument("--t5", help="T5-XXL: a Hugging Face directory, or a single .safetensors file")
    weights.add_argument("--t5-tokenizer", help="tokenizer directory (needed with a single T5 file)")
    weights.add_argument("--dtype", choices=WEIGHT_DTYPE_CHOICES, default="auto", help="DiT weights; auto: bf16 on GPU, fp32 on CPU")
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
    spec: object  # workers.protocol.PoolSpec, resolved by workers.options
    latent_shape: tuple[int, ...]
    output: str
    loras: tuple = ()  # mochi.lora.LoraSpec, checked against the DiT
    cache: object = None  # mochi.step_cache.StepCacheSpec or None
    cfg: float | tuple = 4.5  # --cfg, or --cfg-schedule parsed (one scale per step)
    input_video: object = None  # input_video.InputVideo (--input-video) or None
    denoise: float = 1.0
    fps: int = 30

    @property
    def parallel(self):
        return self.spec.parallel

    @property
    def device(self) -> str:
        return self.spec.device


def _degree(name: str, value: str) -> int | None:
    """A degree flag: an integer, or None for 'auto'."""
    if str(value).lower() == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"--{name}={value!r}: give a positive integer or 'auto'") from None
    if number < 1:
        raise InputError(f"--{name}={number}: degrees are positive integers (or 'auto')")
    return number


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


def plan_run(args) -> Plan:
    """Check every input without starting anything; raise InputError saying what to change."""
    from .mochi.sampler import latent_shape_for_video

    given = [name for name in ("dit", "vae", "t5") if getattr(args, name)]
    demo = not given
    if given and len(given) != 3:
        missing = sorted({"dit", "vae", "t5"} - set(given))
        raise InputError(f"give all of --dit, --vae and --t5 (missing: {', '.join('--' + m for m in missing)}), "
                         "or none of them for the built-in demo model")
    source, denoise = read_source(args)  # sets width, height and frames from an input video
    defaults = DEMO_DEFAULTS if demo else REAL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1:
        raise InputError(f"--steps={args.steps}: need at least 1 step")
    if args.cfg < 0:
        raise InputError(f"--cfg={args.cfg}: use a scale >= 0 (1 disables guidance; Mochi's default is 4.5)")
    cfg = args.cfg
    if args.cfg_schedule is not None:
        from .mochi.schedule import parse_cfg_schedule

        try:
            cfg = parse_cfg_schedule(args.cfg_schedule, args.steps)
        except ValueError as error:
            raise InputError(f"--cfg-schedule: {error}") from None
    if args.fps is None:
        args.fps = source.fps if source is not None else 30
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
        from .mochi.demo import demo_checkpoints

        dit_path, vae_path = (str(p) for p in demo_checkpoints())
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
        dit_path, vae_path = os.path.abspath(args.dit), os.path.abspath(args.vae)
    spec = resolve_spec(args, dit_path, vae_path, use_cfg=any(c != 1.0 for c in (cfg if isinstance(cfg, tuple) else (cfg,))))
    if source is not None:
        from .mochi.checkpoint import CheckpointError, require_vae_encoder

        try:
            require_vae_encoder(vae_path)
        except CheckpointError as error:
            raise InputError(f"--input-video needs a VAE with an encoder: {error}") from None
    return Plan(demo, dit_path, vae_path, None if demo else args.t5, args.t5_tokenizer, spec, latent_shape, output,
                resolve_loras(args, spec), resolve_step_cache(args), cfg, source, denoise, args.fps)


def read_source(args):
    """(InputVideo or None, denoise) from --input-video / --frames / --denoise; the video's size
    and frame count become --width/--height/--frames (given values must agree)."""
    if args.input_video is None:
        if args.denoise is not None and args.denoise != 1.0:
            raise InputError(f"--denoise={args.denoise} needs --input-video (without one, sampling starts from noise)")
        return None, 1.0
    from .input_video import read_input_video

    denoise = 0.6 if args.denoise is None else args.denoise
    if not 0.0 < denoise <= 1.0:
        raise InputError(f"--denoise={denoise}: use a value in (0, 1]; 0.6 keeps the input's layout, 1 ignores it")
    if not os.path.isfile(args.input_video):
        raise InputError(f"--input-video {args.input_video}: no such file; give the path of a video file")
    try:
        source = read_input_video(args.input_video, args.frames)
    except ValueError as error:
        raise InputError(f"--input-video: {error}") from None
    width, height, frames = source.size
    for flag, name, value in (("--width", "width", width), ("--height", "height", height)):
        if getattr(args, name) not in (None, value):
            raise InputError(f"{flag}={getattr(args, name)} but {args.input_video} is {width}x{height}; leave {flag} "
                             "out (the input's size is used) or resize the video first")
    if frames < source.available:
        _say(f"--input-video: using the first {frames} of its {source.available} frames (Mochi takes 6k+1)")
    args.width, args.height, args.frames = width, height, frames
    return source, denoise


def resolve_loras(args, spec) -> tuple:
    """The --lora flags as LoraSpecs, each checked against the DiT (header only)."""
    from .mochi.lora import LoraSpec
    from .workers.options import OptionsError, resolve_lora

    loras = []
    for text in args.lora:
        try:
            parsed = LoraSpec.parse(text)
            if not os.path.isfile(parsed.path):
                raise InputError(f"--lora {text}: no such file; give the path of a LoRA .safetensors file")
            loras.append(resolve_lora(spec, parsed.path, parsed.strength))
        except (OptionsError, ValueError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"--lora {text}: {error}") from None
    return tuple(loras)


def resolve_step_cache(args):
    from .workers.options import OptionsError, resolve_cache

    try:
        return resolve_cache(args.cache, args.cache_threshold)
    except OptionsError as error:
        raise InputError(f"--cache/--cache-threshold: {error}") from None


def resolve_spec(args, dit_path: str, vae_path: str, use_cfg: bool = True):
    """The pool's PoolSpec from the flags, through the one resolver the loader node uses too."""
    from .workers.options import LoadChoices, OptionsError, resolve_load

    degrees = {name: _degree(name, getattr(args, attr)) for name, attr in
               (("ulysses", "ulysses"), ("ring", "ring"), ("cfg-parallel", "cfg_parallel"))}
    choices = LoadChoices(
        dit_path=dit_path, vae_path=vae_path, weight_dtype=args.dtype, world_size=args.world_size,
        cfg=degrees["cfg-parallel"], ulysses=degrees["ulysses"], ring=degrees["ring"], device=args.device,
        cpu_threads=args.cpu_threads, ray_address=args.ray_address, video=(args.width, args.height, args.frames),
        steps=args.steps, use_cfg=use_cfg, attention=args.attention,
    )
    try:
        return resolve_load(choices)
    except OptionsError as error:
        flag = FLAGS[error.field.value]
        if error.field.value in ("dit", "vae"):
            flag = f"{flag} {getattr(args, error.field.value) or '(demo model)'}"
        advice = error.advice(dit_input="--dit", vae_input="--vae")
        message = f"{error} {advice}" if advice else str(error)
        raise InputError(message if error.field.value == "degrees" else f"{flag}: {message}") from None


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


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args) -> int:
    from tqdm import tqdm

    from .mochi.sampler import SampleRequest
    from .workers.options import layout_note
    from .workers.service import MochiService

    plan = plan_run(args)
    if plan.demo:
        from .mochi.demo import DEMO_NOTICE

        bar = "!" * 78
        _say(f"{bar}\n!!! {DEMO_NOTICE}\n{bar}")
    started = time.perf_counter()
    service = MochiService(log=_say)
    try:
        if plan.device == "cpu":  # encode while the ranks start (on GPU, T5 first: it needs GPU memory)
            with ThreadPoolExecutor(max_workers=1) as background:
                encoded = background.submit(encode_prompts, plan, args.prompt, args.negative_prompt)
                try:
                    pool = service.open(plan.spec)
                finally:
                    positive, negative = encoded.result()
        else:
            positive, negative = encode_prompts(plan, args.prompt, args.negative_prompt)
            pool = service.open(plan.spec)
        start = {"latent_shape": plan.latent_shape}
        if plan.input_video is not None:
            from .mochi.vae_encoder import images_to_video

            _say(f"encoding the input video (tiles spread over the ranks); denoise {plan.denoise:g}")
            start = {"init_latent": pool.encode(images_to_video(plan.input_video.frames))}  # [1, 12, T, H/8, W/8]
        request = SampleRequest(positive, negative, **start, seed=args.seed, steps=args.steps, cfg=plan.cfg,
                                schedule=args.schedule, denoise=plan.denoise, cache=plan.cache)
        note = layout_note(plan.parallel, request.uses_cfg)
        if note:
            _say(f"note: {note}")
        if plan.loras:
            _say("LoRAs: " + ", ".join(f"{os.path.basename(lora.path)} x {lora.strength:g}" for lora in plan.loras))
        with tqdm(total=request.steps, desc="sampling", unit="step", file=sys.stderr) as progress:
            result = pool.run(request, on_step=lambda report: progress.update(1), loras=plan.loras)
        latent = result.latent
        if result.cache_stats is not None:
            _say(f"step cache ({args.cache}, threshold {plan.cache.threshold:g}): {result.cache_stats}")
        _say("decoding (tiles spread over the ranks)")
        video = pool.decode(latent)  # [1, 3, F, H, W]
    finally:
        service.shutdown()
    write_mp4(video[0], plan.output, plan.fps)
    _, _, F, H, W = video.shape
    _say(f"wrote {plan.output}: {F} frames, {W}x{H}, {plan.fps} fps, in {time.perf_counter() - started:.1f} s"
         + (" (DEMO model: noise)" if plan.demo else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # the planner parses its own options
        from .mochi.planner import plan_main

        try:
            return plan_main(argv[1:])
        except ValueError as error:  # the planner's input checks (GPU, link, video size)
            parser.exit(2, f"mochi-xdit plan: error: {error}\n")
    args = parser.parse_args(argv)
    from .workers.capacity import CapacityError
    from .workers.failures import PoolError
    from .workers.ray_runtime import RayAddressError

    try:
        return run(args)
    except (InputError, CapacityError, RayAddressError) as error:
        parser.exit(2, f"mochi-xdit: error: {error}\n")
    except PoolError as error:
        parser.exit(1, f"mochi-xdit: error: {error}\n")
    except KeyboardInterrupt:
        _say("interrupted; every rank was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
