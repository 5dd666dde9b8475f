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

class InputError(ValueError):
    """A command-line input that cannot work; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    from .workers.option_table import Door, add_cli_flags

    parser = argparse.ArgumentParser(prog="mochi-xdit", description="Mochi-1 text-to-video on many ranks (Ray).")
    commands = parser.add_subparsers(dest="command", required=True)
    planner = commands.add_parser(
        "plan", add_help=False,
        help="will it fit? per-rank memory, FLOPs and traffic of every degree mix (mochi-xdit plan --help)",
    )
    planner.add_argument("rest", nargs=argparse.REMAINDER)
    gen = commands.add_parser("generate", help="generate one video and write it as mp4")
    add_cli_flags(gen, Door.GENERATE)
    return parser


@dataclass(frozen=True)
class RunInputs:
    """Checked inputs: everything needed to run, decided before any actor starts."""

    demo: bool
    dit_path: str
    vae_path: str
    t5_path: str | None  # None: the demo T5
    t5_tokenizer: str | None
    spec: object  # workers.protocol.PoolSpec, resolved by workers.options
    run: object  # workers.run_plan.RunPlan, resolved by workers.run_plan
    latent_shape: tuple[int, ...]
    output: str
    loras: tuple = ()  # mochi.lora.LoraSpec, checked against the DiT
    input_video: object = None  # input_video.InputVideo (--input-video) or None
    fps: int = 30

    @property
    def parallel(self):
        return self.spec.parallel

    @property
    def device(self) -> str:
        return self.spec.device


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


def check_inputs(args) -> RunInputs:
    """Check every input without starting anything; raise InputError saying what to change. The
    flags are only converted here: the limits are the option table's, the rules the resolvers'."""
    from .mochi.sampler import VideoSizeError, latent_shape_for_video
    from .workers.option_table import Door, option, options_at, value_problem
    from .workers.options import OptionsError
    from .workers.run_plan import RunChoices, resolve_run, resolve_video

    given = [name for name in ("dit_name", "vae_name", "t5") if getattr(args, name)]
    demo = not given
    if given and len(given) != 3:
        missing = sorted(option(name).cli_flag for name in {"dit_name", "vae_name", "t5"} - set(given))
        raise InputError(f"give all of --dit, --vae and --t5 (missing: {', '.join(missing)}), "
                         "or none of them for the built-in demo model")
    for entry in options_at(Door.GENERATE):
        value = getattr(args, entry.name)
        problem = None if value is None or entry.repeat else value_problem(entry, value)
        if problem:
            raise InputError(f"{entry.cli_flag}: {problem}")
    source, denoise = read_source(args)  # an input video sets width, height and frames
    width, height, frames = resolve_video(args.width, args.height, args.frames, demo)
    fps = args.fps if args.fps is not None else (source.fps if source is not None else option("fps").default)
    try:
        latent_shape = latent_shape_for_video(width, height, frames)
    except VideoSizeError as error:
        raise InputError(f"{option(error.dimension).cli_flag}: {error}") from None
    try:
        run = resolve_run(RunChoices(seed=args.seed, steps=args.steps, cfg=args.cfg, scheduler=args.scheduler,
                                     cache=args.cache, cache_threshold=args.cache_threshold, denoise=denoise,
                                     cfg_schedule=args.cfg_schedule, demo=demo))
    except OptionsError as error:
        raise flag_error(error, args) from None
    output = _check_output(args.output)
    if demo:
        from .cli_phases import prepare_demo

        dit_path, vae_path = prepare_demo(_say)
    else:
        from .workers.model_files import model_file_problem

        for name in ("dit_name", "vae_name"):
            problem = model_file_problem(getattr(args, name))
            if problem:
                raise InputError(f"{option(name).cli_flag} {problem}")
        if not os.path.exists(args.t5):
            raise InputError(f"--t5 {args.t5}: no such file or directory; give a T5-XXL directory or .safetensors file")
        if os.path.isfile(args.t5) and not args.t5_tokenizer:
            raise InputError(f"--t5 {args.t5} is a single file; also give --t5-tokenizer (a T5 tokenizer directory)")
        if args.t5_tokenizer and not os.path.isdir(args.t5_tokenizer):
            raise InputError(f"--t5-tokenizer {args.t5_tokenizer}: not a directory; give the tokenizer's folder")
        dit_path, vae_path = os.path.abspath(args.dit_name), os.path.abspath(args.vae_name)
    spec = resolve_spec(args, dit_path, vae_path, (width, height, frames), run)
    if source is not None:
        from .mochi.checkpoint import CheckpointError, require_vae_encoder

        try:
            require_vae_encoder(vae_path)
        except CheckpointError as error:
            raise InputError(f"--input-video needs a VAE with an encoder: {error}") from None
    return RunInputs(demo, dit_path, vae_path, None if demo else args.t5, args.t5_tokenizer, spec, run, latent_shape,
                     output, resolve_loras(args, spec), source, fps)


def read_source(args):
    """(InputVideo or None, denoise) from --input-video / --frames / --denoise; the video's size
    and frame count become --width/--height/--frames (given values must agree)."""
    if args.input_video is None:
        if args.denoise is not None and args.denoise != 1.0:
            raise InputError(f"--denoise={args.denoise} needs --input-video (without one, sampling starts from noise)")
        return None, 1.0
    from .input_video import read_input_video

    denoise = 0.6 if args.denoise is None else args.denoise
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


def flag_error(error, args) -> InputError:
    """An OptionsError as this command line says it: the flag first (the degrees name themselves)."""
    from .workers.option_table import Door, Field, option_for_field

    entry = option_for_field(error.field, Door.GENERATE)
    advice = error.advice(dit_input="--dit", vae_input="--vae")
    message = f"{error} {advice}" if advice else str(error)
    if entry is None or error.field is Field.DEGREES:
        return InputError(message)
    flag = entry.cli_flag
    if error.field in (Field.DIT, Field.VAE):
        flag = f"{flag} {getattr(args, entry.name) or '(demo model)'}"
    return InputError(f"{flag}: {message}")


def lora_flag(text: str) -> tuple[str, float]:
    """`--lora FILE[:STRENGTH]` as (path, strength): the text after the last ':' is the strength unless
    the whole text names a file (so `C:\\loras\\x.safetensors` stays a path)."""
    from .workers.option_table import option, value_problem

    head, sep, tail = text.rpartition(":")
    if not text or (sep and not head):
        raise InputError(f"--lora {text!r}: give FILE[:STRENGTH], e.g. my_lora.safetensors:0.8")
    if not sep or os.path.exists(text):
        return text, option("strength").default
    try:
        strength = float(tail)
    except ValueError:
        if os.path.exists(head):
            raise InputError(f"--lora {text}: strength {tail!r} is not a number; give FILE[:STRENGTH], e.g. "
                             f"{head}:0.8") from None
        return text, option("strength").default
    problem = value_problem(option("strength"), strength)
    if problem:
        raise InputError(f"--lora {text}: LoRA {problem} (the LoRA node's limits)")
    return head, strength


def resolve_loras(args, spec) -> tuple:
    """The --lora flags as LoraSpecs, each checked against the DiT (header only)."""
    from .workers.options import OptionsError, resolve_lora

    loras = []
    for text in args.lora_name:
        path, strength = lora_flag(text)
        if not os.path.isfile(path):
            raise InputError(f"--lora {text}: no such file; give the path of a LoRA .safetensors file")
        try:
            loras.append(resolve_lora(spec, path, strength))
        except OptionsError as error:
            raise InputError(f"--lora {text}: {error}") from None
    return tuple(loras)


def resolve_spec(args, dit_path: str, vae_path: str, video: tuple[int, int, int], run):
    """The pool's PoolSpec from the flags, through the one resolver the loader node uses too."""
    from .workers.option_table import AUTO_DEGREE
    from .workers.options import LoadChoices, OptionsError, resolve_load

    def degree(value: int) -> int | None:
        return None if value == AUTO_DEGREE else value

    choices = LoadChoices(
        dit_path=dit_path, vae_path=vae_path, weight_dtype=args.weight_dtype, world_size=args.world_size,
        cfg=degree(args.cfg_degree), ulysses=degree(args.ulysses_degree), ring=degree(args.ring_degree),
        device=args.device, cpu_threads=args.cpu_threads, ray_address=args.ray_address, video=video,
        steps=run.steps, use_cfg=run.uses_cfg, attention=args.attention_backend, weights=args.weights,
        compile=args.compile,
    )
    try:
        return resolve_load(choices, on_note=_say)
    except OptionsError as error:
        raise flag_error(error, args) from None


def encode_prompts(plan: RunInputs, prompt: str, negative: str):
    """(positive, negative) TextConditions from T5 in this process; the encoder and its GPU cache are
    freed before this returns (`text_encoder.encode_then_free`)."""
    import torch

    from .mochi.guidance import default_compute_dtype
    from .mochi.text_encoder import demo_text_encoder, encode_then_free, load_text_encoder

    _say("encoding the prompts (T5, in this process)")

    def load():
        if plan.demo:
            from .mochi.demo import demo_dir

            return demo_text_encoder(str(demo_dir()))
        device = torch.device("cuda" if plan.device == "cuda" and torch.cuda.is_available() else "cpu")
        return load_text_encoder(plan.t5_path, plan.t5_tokenizer, default_compute_dtype(device), device.type)

    positive, negative_condition = encode_then_free(load, (prompt, negative))  # T5 gone before the ranks load
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


def run(args, started: float | None = None) -> int:
    """Generate and write the video; `started` is when the command began (for the final "in N s")."""
    from .cli_output import OutputFile
    from .cli_phases import quiet_third_party_progress

    started = time.perf_counter() if started is None else started
    quiet_third_party_progress()
    plan = check_inputs(args)
    output = OutputFile(plan.output)  # created before any rank starts: a path that cannot be written fails now
    try:
        return _generate(args, plan, started)
    except BaseException:
        output.discard()
        raise


def _generate(args, plan: RunInputs, started: float) -> int:
    from tqdm import tqdm

    from .workers.run_plan import layout_note
    from .workers.service import MochiService

    if plan.demo:
        from .mochi.demo import DEMO_NOTICE

        bar = "!" * 78
        _say(f"{bar}\n!!! {DEMO_NOTICE}\n{bar}")
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

            _say(f"encoding the input video (tiles spread over the ranks); denoise {plan.run.denoise:g}")
            start = {"init_latent": pool.encode(images_to_video(plan.input_video.frames))}  # [1, 12, T, H/8, W/8]
        request = plan.run.sample_request(positive, negative, **start)
        for note in (*plan.run.notes, layout_note(plan.parallel, plan.run.uses_cfg)):
            if note:
                _say(f"note: {note}")
        if plan.loras:
            _say("LoRAs: " + ", ".join(f"{os.path.basename(lora.path)} x {lora.strength:g}" for lora in plan.loras))
        with tqdm(total=request.steps, desc="sampling", unit="step", file=sys.stderr) as progress:
            result = pool.run(request, on_step=lambda report: progress.update(1), loras=plan.loras)
        latent = result.latent
        if result.cache_stats is not None:
            cache = plan.run.cache
            _say(f"step cache ({cache.kind.value}, threshold {cache.threshold:g}): {result.cache_stats}")
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
    started = time.perf_counter()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # the planner parses its own options
        from .mochi.planner import plan_main

        try:
            return plan_main(argv[1:])
        except ValueError as error:  # the planner's input checks (GPU, link, video size)
            parser.exit(2, f"mochi-xdit plan: error: {error}\n")
    args = parser.parse_args(argv)
    from .cli_output import OutputFileError
    from .workers.capacity import CapacityError
    from .workers.failures import PoolError
    from .workers.model_files import ModelFileError
    from .workers.ray_runtime import RayAddressError

    try:
        return run(args, started)
    except (InputError, CapacityError, RayAddressError, OutputFileError, ModelFileError) as error:
        parser.exit(2, f"mochi-xdit: error: {error}\n")
    except PoolError as error:
        parser.exit(1, f"mochi-xdit: error: {error}\n")
    except KeyboardInterrupt:
        _say("interrupted; every rank was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
