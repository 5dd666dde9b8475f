"""Queue-time checks shared by the nodes' `VALIDATE_INPUTS` and their run methods.

Each check returns None when the value is fine, or a message that says what is wrong and what to
change. `VALIDATE_INPUTS` raises it as `QueueTimeError` (see `refuse`): ComfyUI then answers
`POST /prompt` with 400 and runs nothing. The run method raises it as a ValueError, because an
input that arrives through a link is only known at run time. ComfyUI skips its own min/max/combo
checks for every input that `VALIDATE_INPUTS` names, so these checks repeat them. The rules about
files, degrees, dtypes and capacity are the resolver's (`workers/options.py`), shared with the CLI.
"""

import os
import re

from ..mochi.constants import LATENT_CHANNELS

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
GGUF_EXTENSION = ".gguf"  # DiT files only; ComfyUI itself does not list them in diffusion_models
DIT_FOLDER = "diffusion_models"
VAE_FOLDER = "vae"


class QueueTimeError(ValueError):
    """A bad input found by VALIDATE_INPUTS. Raised rather than returned: ComfyUI repeats a returned
    message once per argument of VALIDATE_INPUTS, each time labelled with that argument's name, while
    an exception from a node's validation is reported once, on that node (execution.py,
    validate_inputs; checked on ComfyUI 0.3.64)."""


def refuse(problem: str | None) -> bool:
    """VALIDATE_INPUTS' answer: True, or QueueTimeError(problem)."""
    if problem:
        raise QueueTimeError(problem)
    return True


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
    if name.lower().endswith(GGUF_EXTENSION) and folder == DIT_FOLDER:
        return None
    if not name.lower().endswith(SAFETENSORS_EXTENSIONS):
        kinds = "a .safetensors or .gguf file" if folder == DIT_FOLDER else "a .safetensors file"
        return (
            f"{name!r} is not {kinds}; this pack only loads safetensors and GGUF (pickled "
            ".ckpt/.pt/.bin files can run code when loaded). Convert it or download the "
            ".safetensors version"
        )
    return None


def loadable_names(folder: str) -> list[str]:
    """The files the pack can load that ComfyUI lists in a models folder (all its search paths):
    .safetensors, and in the DiT folder also .gguf files (found here, since ComfyUI does not list them)."""
    import folder_paths

    names = [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(SAFETENSORS_EXTENSIONS)]
    return names + (sorted(gguf_files(folder)) if folder == DIT_FOLDER else [])


def gguf_files(folder: str) -> dict[str, str]:
    """{name relative to its search path ("/"-separated, as ComfyUI names files): full path} of the
    .gguf files under every search path of a models folder; the first search path wins a name."""
    import folder_paths

    found: dict[str, str] = {}
    for base in folder_paths.get_folder_paths(folder):
        for root, _, files in os.walk(base, followlinks=True):
            for file in files:
                if file.lower().endswith(GGUF_EXTENSION):
                    path = os.path.join(root, file)
                    found.setdefault(os.path.relpath(path, base).replace(os.sep, "/"), path)
    return found


def resolve_model_file(name, folder: str) -> tuple[str | None, str | None]:
    """(full path, None) for a listed safetensors file in `folder`, else (None, message)."""
    problem = model_name_problem(name, folder)
    if problem:
        return None, problem
    import folder_paths

    ggufs = gguf_files(folder) if name.lower().endswith(GGUF_EXTENSION) else None
    if name not in (ggufs if ggufs is not None else folder_paths.get_filename_list(folder)):
        return None, (
            f"{name!r} was not found in ComfyUI/models/{folder}/ (or the extra model paths for "
            f"'{folder}'); put the file there and refresh the node list (press 'r')"
        )
    path = ggufs[name] if ggufs is not None else folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        return None, f"{name!r} is listed but cannot be opened (a broken link?); check ComfyUI/models/{folder}/"
    return path, None


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
    if min(samples.shape[0], samples.shape[2], samples.shape[3], samples.shape[4]) < 1:
        return (f"the latent has shape {tuple(samples.shape)}: no frames or no pixels; set EmptyMochiLatentVideo's "
                "length to 1 or more (1 + 6k frames) and width, height and batch_size to at least 16, 16, 1")
    if samples.shape[3] % 2 or samples.shape[4] % 2:
        return (
            f"latent height/width {samples.shape[3]}x{samples.shape[4]} must be even (video size a "
            "multiple of 16); set EmptyMochiLatentVideo's width and height to multiples of 16"
        )
    if not samples.is_floating_point() or not bool(torch.isfinite(samples).all()):
        return "the latent contains non-finite values (NaN/inf); check the node that produced it"
    return None
