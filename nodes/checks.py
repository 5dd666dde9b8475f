"""Queue-time checks shared by the nodes' `VALIDATE_INPUTS` and their run methods.

Each check returns None when the value is fine, or a message that says what is wrong and what to
change. `VALIDATE_INPUTS` returns that message (ComfyUI then answers `POST /prompt` with 400 and
runs nothing); the run method raises it, because an input that arrives through a link is only
known at run time. ComfyUI skips its own min/max/combo checks for every input that
`VALIDATE_INPUTS` names, so these checks repeat them.
"""

import os
import re

from ..mochi.constants import LATENT_CHANNELS, NUM_HEADS

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
DIT_FOLDER = "diffusion_models"
VAE_FOLDER = "vae"
WEIGHT_DTYPES = ("auto", "bf16", "fp8", "fp32")
MAX_WORLD_SIZE = 1024
AUTO_DEGREE = 0  # a degree input of 0 means "choose automatically"

DIT_HEADS_KEY = "pos_frequencies"  # [3, heads, head_dim / 2]: gives the head count


def model_name_problem(name, folder: str) -> str | None:
    """Refuse names that could leave the models folder or load pickled code."""
    if not isinstance(name, str) or not name.strip():
        return f"no file selected; put a .safetensors file into ComfyUI/models/{folder}/ and pick it"
    parts = re.split(r"[\\/]+", name)
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        return (
            f"{name!r} points outside ComfyUI/models/{folder}/; pick a file from the list "
            "(names are relative to that folder, '..' and absolute paths are refused)"
        )
    if not name.lower().endswith(SAFETENSORS_EXTENSIONS):
        return (
            f"{name!r} is not a .safetensors file; this pack only loads safetensors (pickled "
            ".ckpt/.pt/.bin files can run code when loaded). Convert it or download the "
            ".safetensors version"
        )
    return None


def safetensors_names(folder: str) -> list[str]:
    """The .safetensors files ComfyUI lists in a models folder (all its search paths)."""
    import folder_paths

    return [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(SAFETENSORS_EXTENSIONS)]


def resolve_model_file(name, folder: str) -> tuple[str | None, str | None]:
    """(full path, None) for a listed safetensors file in `folder`, else (None, message)."""
    problem = model_name_problem(name, folder)
    if problem:
        return None, problem
    import folder_paths

    if name not in folder_paths.get_filename_list(folder):
        return None, (
            f"{name!r} was not found in ComfyUI/models/{folder}/ (or the extra model paths for "
            f"'{folder}'); put the file there and refresh the node list (press 'r')"
        )
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        return None, f"{name!r} is listed but cannot be opened (a broken link?); check ComfyUI/models/{folder}/"
    return path, None


def dit_file_problem(path: str, name: str) -> tuple[int | None, str | None]:
    """(attention heads, None) for a Mochi DiT file, else (None, message). Reads the header only."""
    from ..mochi.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except CheckpointError as error:
        return None, f"dit_name {name!r}: {error}"
    heads = info.tensors.get(f"{info.dit_prefix}{DIT_HEADS_KEY}") if info.kind == "dit" else None
    if heads is None or len(heads.shape) != 3:
        hint = " Select it in vae_name instead." if info.kind == "vae" else ""
        return None, (
            f"dit_name {name!r} is {info.describe()}, not a Mochi-1 DiT.{hint} Use "
            "mochi_preview_bf16.safetensors (or genmo's dit.safetensors) in models/diffusion_models/"
        )
    return heads.shape[1], None


def vae_file_problem(path: str, name: str) -> str | None:
    """None for a file holding a Mochi VAE decoder, else a message. Reads the header only."""
    from ..mochi.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except CheckpointError as error:
        return f"vae_name {name!r}: {error}"
    if info.kind != "vae" or info.vae_decoder_prefix is None:
        hint = " Select it in dit_name instead." if info.kind == "dit" else ""
        return (
            f"vae_name {name!r} is {info.describe()}, not a Mochi VAE with a decoder.{hint} Use "
            "mochi_vae.safetensors (or genmo's decoder.safetensors) in models/vae/"
        )
    return None


def int_problem(name: str, value, minimum: int, maximum: int) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} must be an integer, got {value!r}"
    if not minimum <= value <= maximum:
        return f"{name}={value} is outside [{minimum}, {maximum}]"
    return None


def float_problem(name: str, value, minimum: float, maximum: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if not minimum <= value <= maximum:  # also refuses NaN
        return f"{name}={value} is outside [{minimum}, {maximum}]"
    return None


def choice_problem(name: str, value, choices) -> str | None:
    if value not in choices:
        return f"{name}={value!r} is not one of {', '.join(map(str, choices))}"
    return None


def degrees_problem(world_size, ulysses_degree, ring_degree, cfg_degree, num_heads: int = NUM_HEADS) -> str | None:
    """Check the degree inputs: all three 0 (auto) or all three set with the right product."""
    for name, value, low in (("world_size", world_size, 1), ("ulysses_degree", ulysses_degree, 0),
                             ("ring_degree", ring_degree, 0), ("cfg_degree", cfg_degree, 0)):
        problem = int_problem(name, value, low, MAX_WORLD_SIZE)
        if problem:
            return problem
    try:
        parallel_config(world_size, ulysses_degree, ring_degree, cfg_degree, num_heads)
    except ValueError as error:
        return str(error)
    return None


def parallel_config(world_size: int, ulysses_degree: int, ring_degree: int, cfg_degree: int, num_heads: int = NUM_HEADS):
    """The ParallelConfig the loader inputs ask for (raises ValueError with the fix)."""
    from ..mochi.parallel.config import ParallelConfig, auto

    degrees = (ulysses_degree, ring_degree, cfg_degree)
    if all(d == AUTO_DEGREE for d in degrees):
        return auto(world_size, num_heads)
    if any(d == AUTO_DEGREE for d in degrees):
        raise ValueError(
            f"ulysses={ulysses_degree}, ring={ring_degree}, cfg={cfg_degree}: set all three degrees "
            "to 0 (choose automatically) or all three to explicit values whose product is world_size"
        )
    return ParallelConfig(world_size, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree,
                          ring_degree=ring_degree, num_heads=num_heads)


def latent_problem(latent) -> str | None:
    """A LATENT dict holding a Mochi video latent [B, 12, T, H, W] with even H and W."""
    import torch

    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        return "the latent input must be a LATENT (a dict with 'samples'), e.g. from EmptyMochiLatentVideo"
    samples = latent["samples"]
    if samples.dim() != 5 or samples.shape[1] != LATENT_CHANNELS:
        return (
            f"the latent has shape {tuple(samples.shape)}, not a Mochi video latent [B, {LATENT_CHANNELS}, T, H, W]; "
            "use EmptyMochiLatentVideo (or a latent made by a Mochi VAE)"
        )
    if samples.shape[3] % 2 or samples.shape[4] % 2:
        return (
            f"latent height/width {samples.shape[3]}x{samples.shape[4]} must be even (video size a "
            "multiple of 16); set EmptyMochiLatentVideo's width and height to multiples of 16"
        )
    if not samples.is_floating_point() or not bool(torch.isfinite(samples).all()):
        return "the latent contains non-finite values (NaN/inf); check the node that produced it"
    return None


# The video `auto` plans for when the loader runs (the loader does not see the video size): the
# largest Mochi-1 video, so the chosen mix fits every smaller one too.
PLAN_WIDTH, PLAN_HEIGHT, PLAN_FRAMES = 848, 480, 163


def planned_parallel_config(parallel, dit_path: str, weight_dtype: str, device: str, ray_address: str):
    """`auto` degrees on a local GPU machine: the planner's recommendation (fastest mix that fits
    this GPU at 848x480x163, counted on fake tensors, a few seconds); explicit degrees, CPU ranks
    and remote clusters (GPU model unknown here) keep `parallel` (`config.auto` for auto).

    Args:
        parallel: the ParallelConfig from `parallel_config`.
        dit_path: the DiT file (its size sets the planner's model).
        weight_dtype: resolved dtype ("bf16", "fp8", "fp32").
        device: "cuda" or "cpu".
        ray_address: "" for a private local Ray.
    """
    import torch

    if device != "cuda" or ray_address.strip() or weight_dtype not in ("bf16", "fp8"):
        return parallel
    from ..mochi.checkpoint import inspect_checkpoint
    from ..mochi.dit import DiTConfig
    from ..mochi.planner.hardware import gpu_from_device_name
    from ..mochi.planner.plan import recommend

    info = inspect_checkpoint(dit_path)
    shapes = {name[len(info.dit_prefix):]: t.shape for name, t in info.tensors.items() if name.startswith(info.dit_prefix)}
    properties = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(torch.cuda.get_device_name(0), properties.total_memory)
    return recommend(parallel.world_size, PLAN_WIDTH, PLAN_HEIGHT, PLAN_FRAMES, gpu=gpu, weight_dtype=weight_dtype,
                     config=DiTConfig.from_shapes(shapes))
