"""Every user option, declared once: name, type, default, limits, help and the doors that show it.

The nodes' `INPUT_TYPES` entries (with tooltips), their queue-time range and choice checks and the
CLI's argparse flags are all generated from `OPTIONS`, so a default or a limit changes in one line.
The rules that combine options (degrees, files, caching on the on-rank path) are the resolvers'
(`options.resolve_load`, `run_plan.resolve_run`). Importable without torch, Ray or ComfyUI: the
CLI's `--help` is built from it.
"""

import argparse
import math
from dataclasses import dataclass
from enum import Enum, Flag, auto

from ..mochi.constants import DEFAULT_CACHE_THRESHOLD, DEFAULT_CFG, DEFAULT_STEPS, SCHEDULE_NAMES, SPATIAL_COMPRESSION
from .choices import (ATTENTION_CHOICES, AUTO, CACHE_CHOICES, COMPILE_CHOICES, DEVICE_CHOICES, WEIGHT_DTYPE_CHOICES,
                      WEIGHTS_CHOICES)

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_STEPS = 1000
MAX_CFG = 100.0
MAX_LORA_STRENGTH = 10.0
MAX_WORLD_SIZE = 1024
AUTO_DEGREE = 0  # a degree of 0 means "choose automatically" (the CLI also takes the word auto)
TILE_PIXELS = SPATIAL_COMPRESSION  # decode tile sizes are output pixels, multiples of one latent cell


class Kind(Enum):
    """What a value is; decides the widget, the argparse type and the check."""

    INT = "INT"
    FLOAT = "FLOAT"
    CHOICE = "COMBO"
    TEXT = "STRING"
    BOOL = "BOOLEAN"  # a toggle in ComfyUI; --name / --no-name on the CLI
    PATH = "PATH"  # a file or folder on the CLI; a list of model files in a node (the host supplies it)
    DEGREE = "DEGREE"  # an INT where 0 means automatic (the CLI also takes "auto")


class Door(Flag):
    """Where an option is shown: a node's widget or a CLI flag."""

    LOADER = auto()
    SAMPLER = auto()
    DECODE = auto()
    LORA = auto()
    GUIDER = auto()
    GENERATE = auto()  # `mochi-xdit generate`
    ENCODE = auto()
    NODES = LOADER | SAMPLER | DECODE | LORA | GUIDER | ENCODE


class Field(Enum):
    """The resolvers' names for what an OptionsError is about; each door names it its own way
    (`Option.field` ties an option to its field)."""

    DIT = "dit"
    VAE = "vae"
    WEIGHT_DTYPE = "weight_dtype"
    DEVICE = "device"
    WORLD_SIZE = "world_size"
    DEGREES = "degrees"
    CPU_THREADS = "cpu_threads"
    RAY_ADDRESS = "ray_address"
    ATTENTION = "attention_backend"
    COMPILE = "compile"
    LORA = "lora"
    CACHE = "cache"
    SEED = "seed"
    STEPS = "steps"
    CFG = "cfg"
    CFG_SCHEDULE = "cfg_schedule"
    DENOISE = "denoise"
    SAMPLER = "sampler_name"
    SCHEDULER = "scheduler"
    VIDEO = "video"
    WEIGHTS = "weights"


@dataclass(frozen=True)
class Option:
    """One user option.

    Args:
        name: the node input's name (and the CLI flag's, with dashes, unless `flag` is given).
        kind: the value's Kind.
        help: the tooltip and the `--help` line (`cli_help` replaces it on the CLI).
        doors: the doors that show it.
        default: the default at every door (None on the CLI: the resolver decides, see cli_help).
        low, high: inclusive limits (INT, FLOAT, DEGREE).
        step, round: the widget's step and rounding.
        choices: CHOICE values (a node door may be given the host's list instead, see `host_choices`).
        host_choices: the node's choices come from ComfyUI (its sampler list, a models folder).
        optional_at: node doors where the input sits under "optional" (inputs added after release).
        hidden_at: node doors where the input is "hidden": no widget, but a prompt may still send it
            (a renamed input kept for saved API prompts).
        seed_widget: an INT with ComfyUI's control_after_generate (one extra UI-only widget value).
        flag: the CLI flag when it differs from `--name-with-dashes`.
        cli_unset: the CLI flag defaults to None, so the resolver can tell "not given" (it then picks
            the value: the demo model's steps, the cache kind's threshold, ...).
        cli_required: the CLI flag must be given.
        cli_aliases: older names of the CLI flag that still work.
        cli_help: the `--help` text when it differs from the tooltip.
        group: the `--help` section.
        field: the resolver field an OptionsError names for this option.
        multiline: a TEXT widget over several lines.
        repeat: a CLI flag given several times (a list).
        metavar: the CLI's placeholder.
    """

    name: str
    kind: Kind
    help: str
    doors: Door
    default: object = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    round: float | None = None
    choices: tuple = ()
    host_choices: bool = False
    optional_at: Door = Door(0)
    hidden_at: Door = Door(0)
    seed_widget: bool = False
    flag: str | None = None
    cli_unset: bool = False
    cli_required: bool = False
    cli_aliases: tuple = ()
    cli_help: str | None = None
    group: str = "options"
    field: Field | None = None
    multiline: bool = False
    repeat: bool = False
    metavar: str | None = None

    def __post_init__(self):
        if self.kind in (Kind.INT, Kind.FLOAT, Kind.DEGREE) and (self.low is None or self.high is None):
            raise ValueError(f"option {self.name}: a number needs low and high")
        if self.kind is Kind.CHOICE and not self.choices:
            raise ValueError(f"option {self.name}: a choice needs its choices")
        if self.default is not None and self.kind is not Kind.PATH:
            problem = value_problem(self, self.default)
            if problem:
                raise ValueError(f"option {self.name}: the default is refused: {problem}")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def value_problem(entry: Option, value, choices=None) -> str | None:
    """None when `value` is a valid `entry`, else what is wrong (the input's name, the value, the range).
    choices: the door's list for a host_choices option (ComfyUI's samplers), else the table's."""
    name = entry.name
    if entry.kind in (Kind.INT, Kind.DEGREE):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be an integer, got {value!r}"
    elif entry.kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{name}={value} is outside [{entry.low}, {entry.high}]"
    elif entry.kind is Kind.CHOICE:
        allowed = entry.choices if choices is None else choices
        if value not in allowed:
            return f"{name}={value!r} is not one of {', '.join(map(str, allowed))}"
        return None
    elif entry.kind in (Kind.TEXT, Kind.PATH):
        return None if isinstance(value, str) else f"{name} must be text, got {value!r}"
    elif entry.kind is Kind.BOOL:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if not entry.low <= value <= entry.high:
        return f"{name}={value} is outside [{entry.low}, {entry.high}]"
    return None


# ---------------------------------------------------------------------------------------------- the table

_OPTIONS = (
    # ---- prompt and video (CLI; in ComfyUI they arrive as CONDITIONING and LATENT)
    Option("prompt", Kind.TEXT, "what the video shows", Door.GENERATE, cli_required=True,
           group="prompt"),
    Option("negative_prompt", Kind.TEXT, "what to steer away from (empty: none, genmo's default)", Door.GENERATE,
           default="", group="prompt"),
    Option("width", Kind.INT, "pixels, multiple of 16", Door.GENERATE, low=16, high=8192, group="video",
           field=Field.VIDEO, cli_help="pixels, multiple of 16 (default 848; demo model 128)"),
    Option("height", Kind.INT, "pixels, multiple of 16", Door.GENERATE, low=16, high=8192, group="video",
           field=Field.VIDEO, cli_help="pixels, multiple of 16 (default 480; demo model 96)"),
    Option("frames", Kind.INT, "6k+1 frames", Door.GENERATE, low=1, high=10_000, group="video", field=Field.VIDEO,
           cli_help="6k+1 frames, e.g. 31, 85, 163 (default 31; demo model 13)"),
    Option("fps", Kind.INT, "frames per second of the mp4 (Mochi: 30)", Door.GENERATE, default=30, low=1, high=240,
           group="video", cli_unset=True, cli_help="frames per second of the mp4 (default 30, or the input video's)"),
    Option("input_video", Kind.PATH, "video-to-video: encode this file (PyAV) and denoise it with the prompt; its "
           "size is used (multiples of 16) and its first 6k+1 frames (all that fit, or --frames)", Door.GENERATE,
           group="video"),
    # ---- sampling (sampler node, guider node, CLI)
    Option("seed", Kind.INT, "Seed of the starting noise (drawn like KSampler: same seed, same noise).",
           Door.SAMPLER | Door.GENERATE, default=0, low=0, high=MAX_SEED, seed_widget=True, group="sampling",
           field=Field.SEED),
    Option("steps", Kind.INT, f"Denoising steps. Mochi's default is {DEFAULT_STEPS}; fewer is faster and blurrier. "
           "Time grows linearly with steps.", Door.SAMPLER | Door.GENERATE, default=DEFAULT_STEPS, low=1,
           high=MAX_STEPS, step=1, group="sampling", field=Field.STEPS, cli_unset=True,
           cli_help=f"Euler steps (default {DEFAULT_STEPS}; demo model 8)"),
    Option("cfg", Kind.FLOAT, "Classifier-free guidance: higher follows the prompt more closely, too high "
           f"over-saturates. {DEFAULT_CFG} is Mochi's default; 1 skips the negative pass (half the work; on a "
           "cfg_degree 2 pool the second half of the ranks then idles).", Door.SAMPLER | Door.GUIDER | Door.GENERATE,
           default=DEFAULT_CFG, low=0.0, high=MAX_CFG, step=0.1, round=0.01, group="sampling", field=Field.CFG),
    Option("sampler_name", Kind.CHOICE, "ComfyUI's sampler, as in KSampler. euler with scheduler simple or "
           "linear_quadratic runs whole on the ranks; any other runs ComfyUI's own sampler code with every model "
           "evaluation done in lockstep on the pool (CFG on the ranks).", Door.SAMPLER, default="euler",
           choices=("euler",), host_choices=True, optional_at=Door.SAMPLER, field=Field.SAMPLER),
    Option("scheduler", Kind.CHOICE, "ComfyUI's scheduler, as in KSampler. linear_quadratic: genmo's Mochi schedule "
           "(slow start, then quadratic); simple: KSampler's flow schedule for Mochi (shift 6).",
           Door.SAMPLER | Door.GENERATE, default="linear_quadratic", choices=SCHEDULE_NAMES,
           host_choices=True, optional_at=Door.SAMPLER, cli_aliases=("--schedule",),
           cli_help="sigma schedule: genmo's linear_quadratic, or ComfyUI's simple (shift 6)", group="sampling",
           field=Field.SCHEDULER),
    Option("denoise", Kind.FLOAT, "1 starts from pure noise. Below 1 keeps that much of a non-empty input latent "
           "(video-to-video); the run then covers the last steps of a longer schedule.", Door.SAMPLER | Door.GENERATE,
           default=1.0, low=0.01, high=1.0, step=0.01, optional_at=Door.SAMPLER, field=Field.DENOISE,
           cli_unset=True, group="video",
           cli_help="with --input-video: how much to change it, in (0, 1] (default 0.6; 1 ignores it)"),
    Option("cache", Kind.CHOICE, "Step caching: skip the transformer's blocks on steps where their input barely "
           "changes, reusing the last computed residual; every rank skips the same steps. teacache: TeaCache's Mochi "
           f"indicator (published 1.5x at {DEFAULT_CACHE_THRESHOLD}, 2.1x at 0.09 on 163 frames). first_block: "
           "compares the first block's output. off: every step.", Door.SAMPLER | Door.GENERATE, default="off",
           choices=CACHE_CHOICES, optional_at=Door.SAMPLER, group="sampling", field=Field.CACHE,
           cli_help="step caching: skip the blocks on steps whose input barely changes (all ranks agree)"),
    Option("cache_threshold", Kind.FLOAT, "How much change a skipped step may hide: higher skips more steps (faster) "
           "and drifts further from the uncached video. 0 never skips.", Door.SAMPLER | Door.GENERATE,
           default=DEFAULT_CACHE_THRESHOLD, low=0.0, high=1.0, step=0.01, optional_at=Door.SAMPLER,
           cli_unset=True, group="sampling", field=Field.CACHE,
           cli_help=f"how much change a skipped step may hide (default {DEFAULT_CACHE_THRESHOLD}; TeaCache published "
                    "1.5x, 0.09 2.1x); 0 never skips; needs --cache"),
    Option("cfg_schedule", Kind.TEXT, "One cfg per step instead of cfg, e.g. 4.5*40,1*24 (scale*steps, "
           "comma-separated; the counts add up to steps, genmo's cfg_schedule). Steps at 1 skip the negative pass. "
           "Empty: cfg for every step. On-rank path only (euler with simple / linear_quadratic).",
           Door.SAMPLER | Door.GENERATE, default="", optional_at=Door.SAMPLER, group="sampling", field=Field.CFG_SCHEDULE,
           metavar="SCALE*STEPS,..."),
    Option("schedule", Kind.CHOICE, "The scheduler's earlier name (no widget any more): a prompt that sends schedule "
           "and no scheduler runs with it; when both are sent, scheduler wins, as it always did.", Door.SAMPLER,
           choices=SCHEDULE_NAMES, hidden_at=Door.SAMPLER, field=Field.SCHEDULER),
    # ---- LoRA (LoRA node; the CLI's --lora FILE[:STRENGTH] checks its strength through `strength`)
    Option("lora_name", Kind.PATH, "A Mochi-1 LoRA (.safetensors) from models/loras/.", Door.LORA | Door.GENERATE,
           host_choices=True, flag="--lora", repeat=True, metavar="FILE[:STRENGTH]", group="sampling",
           field=Field.LORA, cli_help="a Mochi LoRA .safetensors (genmo, ComfyUI/kohya or diffusers format), "
                                      "strength default 1 (within +-10); repeat to stack"),
    Option("strength", Kind.FLOAT, "How much of the LoRA to add: 1 as trained, 0 none, negative subtracts it.",
           Door.LORA, default=1.0, low=-MAX_LORA_STRENGTH, high=MAX_LORA_STRENGTH, step=0.01, field=Field.LORA),
    # ---- the pool (loader node, CLI)
    Option("dit_name", Kind.PATH, "Mochi-1 DiT weights (.safetensors or .gguf) from models/diffusion_models/, e.g. "
           "mochi_preview_bf16.safetensors, an fp8_scaled file or a GGUF file.", Door.LOADER | Door.GENERATE, host_choices=True,
           flag="--dit", group="weights (all omitted: the built-in demo model)", field=Field.DIT,
           cli_help="Mochi DiT .safetensors or .gguf (genmo dit.safetensors, mochi_preview_bf16, a GGUF file)"),
    Option("vae_name", Kind.PATH, "Mochi VAE (.safetensors with the decoder) from models/vae/, e.g. "
           "mochi_vae.safetensors.", Door.LOADER | Door.GENERATE, host_choices=True, flag="--vae",
           group="weights (all omitted: the built-in demo model)", field=Field.VAE,
           cli_help="Mochi VAE .safetensors (mochi_vae.safetensors or genmo decoder)"),
    Option("t5", Kind.PATH, "T5-XXL: a Hugging Face directory, or a single .safetensors file", Door.GENERATE,
           group="weights (all omitted: the built-in demo model)"),
    Option("t5_tokenizer", Kind.PATH, "tokenizer directory (needed with a single T5 file)", Door.GENERATE,
           group="weights (all omitted: the built-in demo model)"),
    Option("weight_dtype", Kind.CHOICE, "DiT weight precision on every rank. auto = bf16 on GPU, fp32 on CPU. fp8 "
           "halves weight memory (about 10 GB instead of 20 GB) at a small quality cost; fp32 doubles it; fp16 may "
           "overflow (Mochi was trained in bf16).", Door.LOADER | Door.GENERATE, default=AUTO,
           choices=WEIGHT_DTYPE_CHOICES, flag="--dtype", group="weights (all omitted: the built-in demo model)",
           field=Field.WEIGHT_DTYPE, cli_help="DiT weights; auto: bf16 on GPU, fp32 on CPU"),
    Option("world_size", Kind.INT, "Number of ranks (one GPU each). Must equal cfg x ulysses x ring. More ranks: "
           "faster steps and less memory per rank, more communication.", Door.LOADER | Door.GENERATE, default=1,
           low=1, high=MAX_WORLD_SIZE, step=1, group="ranks", field=Field.WORLD_SIZE,
           cli_help="number of ranks (one GPU each, or CPU threads)"),
    Option("ulysses_degree", Kind.DEGREE, "Ranks splitting attention heads by all-to-all (must divide the 24 heads: "
           "1, 2, 3, 4, 6, 8, 12, 24). Best inside one machine with fast links. 0 on all three degrees = automatic: "
           "on a GPU machine the planner's fastest mix that fits 848x480x163 on this GPU, otherwise CFG split first, "
           "then Ulysses, then Ring. 0 on some degrees fills them in from the others.", Door.LOADER | Door.GENERATE,
           default=AUTO_DEGREE, low=0, high=MAX_WORLD_SIZE, step=1, flag="--ulysses", group="ranks",
           field=Field.DEGREES, cli_help="Ulysses degree (divides the heads) or auto"),
    Option("ring_degree", Kind.DEGREE, "Ranks passing key/value blocks around a ring (any number). Use it for "
           "factors Ulysses cannot take. 0 = automatic (what the other degrees leave).", Door.LOADER | Door.GENERATE,
           default=AUTO_DEGREE, low=0, high=MAX_WORLD_SIZE, step=1, flag="--ring", group="ranks",
           field=Field.DEGREES, cli_help="Ring degree or auto"),
    Option("cfg_degree", Kind.DEGREE, "2 runs the positive and negative prompt on separate halves of the ranks "
           "(nearly 2x, one small exchange per step; with cfg 1 the second half idles); 1 runs both on every rank. "
           "0 = automatic (1 when other degrees are set).", Door.LOADER | Door.GENERATE, default=AUTO_DEGREE, low=0,
           high=2, step=1, flag="--cfg-parallel", group="ranks", field=Field.DEGREES,
           cli_help="CFG degree (1 or 2) or auto"),
    Option("device", Kind.CHOICE, "auto: cuda when this machine has a GPU, else cpu (say cuda for a GPU cluster)",
           Door.GENERATE, default=AUTO, choices=DEVICE_CHOICES, group="ranks", field=Field.DEVICE),
    Option("cpu_threads", Kind.INT, "torch threads per CPU rank", Door.GENERATE, default=1, low=1, high=1024,
           group="ranks", field=Field.CPU_THREADS),
    Option("ray_address", Kind.TEXT, "Empty: start a private Ray on this machine (loopback only). Otherwise the "
           "address of an existing Ray cluster ('auto', 'host:6379' or 'ray://host:10001', which needs ray[client]); "
           "it is probed before the current pool is touched. Enable token auth on that cluster.",
           Door.LOADER | Door.GENERATE, default="", group="ranks", field=Field.RAY_ADDRESS,
           cli_help="join this Ray cluster (else RAY_ADDRESS, else a private Ray on 127.0.0.1)"),
    Option("attention_backend", Kind.CHOICE, "Attention kernel on the ranks. auto: the fastest installed "
           "(FlashAttention-3 on Hopper, cuDNN or flash-attn 2 where present, else PyTorch's own fused kernels). "
           "torch: PyTorch's kernels only. flash_attn / flash_attn_3 / xfuser: refused at queue time, with the "
           "install line, when not installed.", Door.LOADER | Door.GENERATE, default=AUTO, choices=ATTENTION_CHOICES,
           optional_at=Door.LOADER, flag="--attention", group="ranks", field=Field.ATTENTION,
           cli_help="attention kernel: auto (fastest installed), torch (PyTorch's fused kernels), flash_attn, "
                    "flash_attn_3 (Hopper) or xfuser (xDiT's USP layer; CUDA, 2+ ranks)"),
    Option("compile", Kind.CHOICE, "on: every rank compiles its DiT's blocks with torch.compile when the pool "
           "loads (attention and the exchanges between ranks stay as they are): loading takes minutes longer, "
           "steps should be faster on GPUs; every video size and prompt length reuses the build. off: no compiling.",
           Door.LOADER | Door.GENERATE, default="off", choices=COMPILE_CHOICES, optional_at=Door.LOADER,
           group="ranks", field=Field.COMPILE,
           cli_help="on: compile the DiT's blocks with torch.compile on every rank when the pool loads"),
    Option("weights", Kind.CHOICE, "Where the DiT's weights live. auto: replicated if the whole DiT fits a GPU with "
           "the planner's margin, else sharded, else offload (the log says which and why). replicated: every rank "
           "holds all of it (fastest). sharded: each of N ranks keeps 1/N of every block, gathered block by block "
           "(2+ ranks; for cards smaller than the model). offload: blocks stream from host memory (one small GPU; "
           "nothing on CPU).", Door.LOADER | Door.GENERATE, default=AUTO, choices=WEIGHTS_CHOICES,
           optional_at=Door.LOADER, group="ranks", field=Field.WEIGHTS,
           cli_help="DiT weight placement: auto (replicated if it fits a GPU, else sharded, else offload), "
                    "replicated, sharded (1/N of every block per rank, 2+ ranks), offload (blocks from host memory)"),
    # ---- decoding (decode node)
    Option("tiling", Kind.CHOICE, "auto: tile sizes chosen to bound memory. manual: use the three values below. "
           "off: decode everything at once (most memory).", Door.DECODE | Door.ENCODE, default=AUTO,
           choices=(AUTO, "manual", "off")),
    Option("tile_size", Kind.INT, "manual: tile width and height in output pixels (multiple of 8). Smaller tiles use "
           "less memory and take a little longer.", Door.DECODE | Door.ENCODE, default=256, low=32, high=4096, step=TILE_PIXELS),
    Option("tile_overlap", Kind.INT, "manual: output pixels shared by neighbouring tiles and blended (multiple of 8, "
           "at most half of tile_size); more overlap hides seams better and costs time.", Door.DECODE | Door.ENCODE, default=64,
           low=0, high=1024, step=TILE_PIXELS),
    Option("frame_chunk", Kind.INT, "manual: latent frames decoded per chunk (each makes 6 video frames); the causal "
           "decoder carries state across chunks, so the result is exact. Lower uses less memory.", Door.DECODE,
           default=2, low=1, high=1024, step=1),
    # ---- output (CLI)
    Option("output", Kind.PATH, "mp4 file to write", Door.GENERATE, default="mochi.mp4"),
)
OPTIONS = {option.name: option for option in _OPTIONS}


def option(name: str) -> Option:
    return OPTIONS[name]


def options_at(door: Door) -> tuple[Option, ...]:
    """The options a door shows, in table order."""
    return tuple(entry for entry in _OPTIONS if entry.doors & door)


def option_for_field(field: Field, door: Door) -> Option | None:
    """The first option at `door` an OptionsError about `field` names (None: the error names itself)."""
    return next((entry for entry in options_at(door) if entry.field is field), None)


# ---------------------------------------------------------------------------------------------- checks

def widget_problem(door: Door, values: dict, host_choices: dict | None = None) -> str | None:
    """The first table check a node's widget values fail, in table order; None values (inputs fed by
    a link, or absent optional inputs) are left for run time."""
    host_choices = host_choices or {}
    for entry in options_at(door):
        value = values.get(entry.name)
        if value is not None:
            problem = value_problem(entry, value, host_choices.get(entry.name))
            if problem:
                return problem
    return None


# ---------------------------------------------------------------------------------------------- ComfyUI

def node_inputs(door: Door, host_choices: dict | None = None) -> dict[str, dict]:
    """{"required": {...}, "optional": {...}, "hidden": {...}}: ComfyUI V1 INPUT_TYPES entries for
    `door`'s options, in table order (the frontend makes widgets in this order, required first, and
    a saved UI workflow stores their values by position). host_choices: {name: list} for options
    whose choices ComfyUI supplies."""
    host_choices = host_choices or {}
    inputs = {"required": {}, "optional": {}, "hidden": {}}
    for entry in options_at(door):
        section = "hidden" if entry.hidden_at & door else "optional" if entry.optional_at & door else "required"
        inputs[section][entry.name] = _widget(entry, host_choices.get(entry.name))
    return inputs


def widget_order(door: Door) -> tuple[Option, ...]:
    """The door's widgets as the frontend lays them out, which is also the order of a saved UI
    workflow's `widgets_values`: required inputs, then optional ones, table order within each
    (hidden inputs have no widget; a seed_widget is followed by ComfyUI's control widget)."""
    shown = [entry for entry in options_at(door) if not entry.hidden_at & door]
    required = tuple(entry for entry in shown if not entry.optional_at & door)
    return required + tuple(entry for entry in shown if entry.optional_at & door)


def _widget(entry: Option, choices) -> tuple:
    settings = {"tooltip": entry.help}
    if entry.default is not None:
        settings["default"] = entry.default
    if entry.kind in (Kind.CHOICE, Kind.PATH):
        listed = list(entry.choices if choices is None else choices)
        return listed, settings
    if entry.kind is Kind.TEXT:
        settings["multiline"] = entry.multiline
        return "STRING", settings
    if entry.kind is Kind.BOOL:
        return "BOOLEAN", settings
    settings.update(min=entry.low, max=entry.high)
    for key in ("step", "round"):
        if getattr(entry, key) is not None:
            settings[key] = getattr(entry, key)
    if entry.seed_widget:
        settings["control_after_generate"] = True
    return ("FLOAT" if entry.kind is Kind.FLOAT else "INT"), settings


# ---------------------------------------------------------------------------------------------- CLI

def add_cli_flags(parser: argparse.ArgumentParser, door: Door) -> None:
    """argparse flags for `door`'s options, grouped as in the table; values are only converted here
    (types and choices), every rule is the resolvers'."""
    groups = {}
    for entry in options_at(door):
        if entry.group not in groups:
            groups[entry.group] = parser.add_argument_group(entry.group)
        default = None if entry.cli_unset else entry.default
        shown = "" if default in (None, "") else f" (default: {default})"
        settings = {"help": (entry.cli_help or entry.help) + shown, "default": default}
        if entry.repeat:
            settings.update(action="append", default=[])
        metavar = entry.metavar or {Kind.PATH: "PATH", Kind.DEGREE: "N|auto"}.get(entry.kind)
        if metavar:
            settings["metavar"] = metavar
        if entry.kind is Kind.INT:
            settings["type"] = int
        elif entry.kind is Kind.FLOAT:
            settings["type"] = float
        elif entry.kind is Kind.DEGREE:
            settings["type"] = _degree_flag(entry)
        elif entry.kind is Kind.CHOICE:
            settings["choices"] = entry.choices
        elif entry.kind is Kind.BOOL:
            settings["action"] = argparse.BooleanOptionalAction
        if entry.cli_required:
            settings["required"] = True
        groups[entry.group].add_argument(entry.cli_flag, *entry.cli_aliases, dest=entry.name, **settings)


def _degree_flag(entry: Option):
    def parse(text: str) -> int:
        if str(text).lower() == AUTO:
            return AUTO_DEGREE
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{entry.cli_flag}={text!r}: give a positive integer or 'auto'") from None

    parse.__name__ = entry.name
    return parse


# ---------------------------------------------------------------------------------------------- README

REFERENCE_DOORS = ((Door.LOADER, "Mochi xDiT Loader"), (Door.LORA, "Mochi xDiT LoRA Loader"),
                   (Door.SAMPLER, "Mochi xDiT Sampler"), (Door.GUIDER, "Mochi xDiT Guider"),
                   (Door.DECODE, "Mochi xDiT Tiled VAE Decode"), (Door.ENCODE, "Mochi xDiT Tiled VAE Encode"),
                   (Door.GENERATE, "mochi-xdit generate"))


def reference_markdown() -> str:
    """The README's table of every option (`tools/make_readme_options.py` writes it; a test checks
    that the README holds exactly this)."""
    lines = []
    for door, title in REFERENCE_DOORS:
        cli = door is Door.GENERATE
        lines += [f"**{title}**", "", f"| {'flag' if cli else 'input'} | default | values | what it does |",
                  "|---|---|---|---|"]
        entries = options_at(door) if cli else (*widget_order(door),
                                                *(entry for entry in options_at(door) if entry.hidden_at & door))
        for entry in entries:
            name = f"`{entry.cli_flag if cli else entry.name}`"
            if not cli and entry.hidden_at & door:
                name += " (hidden)"
            elif not cli and entry.optional_at & door:
                name += " (optional)"
            default = None if cli and entry.cli_unset else entry.default
            help_text = (entry.cli_help or entry.help) if cli else entry.help
            lines.append(f"| {name} | {'' if default in (None, '') else f'`{default}`'} | {_values(entry, cli)} | "
                         f"{help_text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def _values(entry: Option, cli: bool) -> str:
    if entry.host_choices and not cli:
        return "a file in its models folder" if entry.kind is Kind.PATH else "ComfyUI's list"
    if entry.kind is Kind.CHOICE:
        return " / ".join(entry.choices)
    if entry.kind in (Kind.INT, Kind.FLOAT, Kind.DEGREE):
        auto_word = " (0 = auto)" if entry.kind is Kind.DEGREE else ""
        return f"{entry.low} .. {entry.high}{auto_word}"
    return {Kind.TEXT: "text", Kind.PATH: "path", Kind.BOOL: "on / off"}[entry.kind]
