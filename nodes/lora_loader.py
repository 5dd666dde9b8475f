"""MochiXDiTLoraLoader: adds a Mochi LoRA to what flows along the pool link (chainable).

The pool and its 20 GB of base weights stay as they are: the sampler asks every rank to apply
exactly the LoRAs on its link for that run (a low-rank addition at call time, switched in
milliseconds), so a prompt without this node runs the base model.
"""

from ..workers.option_table import Door, node_inputs, widget_problem
from . import checks
from .handle import POOL_TYPE

LORA_FOLDER = "loras"


def lora_problem(lora_name, strength, read_header: bool = True) -> str | None:
    """The checks that need no pool: the strength, the file's name and place, and (read_header) what
    the file holds (a safetensors LoRA naming Mochi's layers; header only). Its fit to the pool's
    DiT (widths, depth) is checked when the node runs, where the pool is known."""
    from ..mochi.lora_files import LoraError, inspect_lora

    problem = widget_problem(Door.LORA, {"strength": strength})
    if problem:
        return problem
    path, problem = checks.resolve_model_file(lora_name, LORA_FOLDER)
    if problem:
        return f"lora_name: {problem}"
    if read_header:
        try:
            inspect_lora(path)
        except LoraError as error:
            return f"lora_name {lora_name!r}: {error}"
    return None


class MochiXDiTLoraLoader:
    DESCRIPTION = (
        "Adds a Mochi-1 LoRA (genmo trainer, ComfyUI/kohya or diffusers/PEFT file) to the pool link. Chain "
        "several to stack them. Every rank applies it for the sampler's run without reloading the base "
        "weights; switching LoRAs between prompts takes milliseconds."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = (POOL_TYPE,)
    RETURN_NAMES = ("pool",)
    OUTPUT_TOOLTIPS = ("The same pool, with this LoRA added to the ones its sampler runs with.",)
    FUNCTION = "add_lora"

    @classmethod
    def INPUT_TYPES(cls):
        widgets = node_inputs(Door.LORA, {"lora_name": checks.loadable_names(LORA_FOLDER)})
        return {
            "required": {
                "pool": (POOL_TYPE, {"tooltip": "The rank pool from MochiXDiTLoader (or another LoRA loader)."}),
                **widgets["required"],
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, strength):
        return checks.refuse(lora_problem(lora_name, strength))

    def add_lora(self, pool, lora_name, strength):
        from ..workers.options import OptionsError, resolve_lora

        problem = lora_problem(lora_name, strength, read_header=False)
        if problem:
            raise ValueError(problem)
        path, _ = checks.resolve_model_file(lora_name, LORA_FOLDER)
        try:  # the file read once: what it holds, and its shapes against this pool's DiT (header only)
            lora = resolve_lora(pool.spec, path, strength)
        except OptionsError as error:
            raise ValueError(f"lora_name {lora_name!r}: {error}") from None
        return (pool.with_lora(lora),)
