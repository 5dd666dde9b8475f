"""MochiXDiTLoader: picks the Mochi files and the parallel layout, returns a pool handle.

The node only converts its widgets into a `workers.options.LoadChoices` and names the input an
`OptionsError` is about; the rules themselves are the resolver's, shared with the CLI.
"""

from ..workers.option_table import AUTO_DEGREE, Door, node_inputs, widget_problem
from . import checks
from .handle import POOL_TYPE
from .runs import open_pool


class MochiXDiTLoader:
    DESCRIPTION = (
        "Starts (or reuses) a pool of Ray workers, one per GPU rank, each loading the Mochi-1 DiT "
        "and VAE decoder itself. Replaces UNETLoader + VAELoader in the Mochi graph; the text "
        "encoder stays in ComfyUI (CLIPLoader type 'mochi'). The pool is reused while the files, "
        "dtype, degrees, attention backend and compile setting stay the same."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = (POOL_TYPE,)
    RETURN_NAMES = ("pool",)
    OUTPUT_TOOLTIPS = ("Handle of the rank pool holding the Mochi DiT and VAE; connect it to the sampler and decoder.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return node_inputs(Door.LOADER, {"dit_name": checks.loadable_names(checks.DIT_FOLDER),
                                         "vae_name": checks.loadable_names(checks.VAE_FOLDER)})

    @classmethod
    def VALIDATE_INPUTS(cls, dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                        cfg_degree, ray_address, attention_backend="auto", compile="off", weights="auto"):
        problem, _ = cls._resolve(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                                  cfg_degree, ray_address, attention_backend, compile, weights, plan=False)
        return checks.refuse(problem)

    @staticmethod
    def _resolve(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree, cfg_degree,
                 ray_address, attention_backend, compile, weights, plan: bool):
        """(message, None) for a bad input, else (None, PoolSpec). Reads the two files' headers;
        starts nothing (plan=True also asks the planner for automatic degrees on a local GPU)."""
        from ..workers.option_table import Field
        from ..workers.options import LoadChoices, OptionsError, resolve_load

        dit_path, problem = checks.resolve_model_file(dit_name, checks.DIT_FOLDER)
        if problem:
            return f"dit_name: {problem}", None
        vae_path, problem = checks.resolve_model_file(vae_name, checks.VAE_FOLDER)
        if problem:
            return f"vae_name: {problem}", None
        problem = widget_problem(Door.LOADER, dict(
            weight_dtype=weight_dtype, world_size=world_size, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
            cfg_degree=cfg_degree, ray_address=ray_address, attention_backend=attention_backend, compile=compile,
            weights=weights))
        if problem:
            return problem, None
        choices = LoadChoices(
            dit_path=dit_path, vae_path=vae_path, weight_dtype=weight_dtype, world_size=world_size,
            cfg=degree_choice(cfg_degree), ulysses=degree_choice(ulysses_degree),
            ring=degree_choice(ring_degree), ray_address=ray_address, attention=attention_backend,
            compile=compile,
            weights=weights,
        )
        try:
            return None, resolve_load(choices, plan=plan)
        except OptionsError as error:
            # the file inputs are named with their value; the others name themselves
            files = {Field.DIT: f"dit_name {dit_name!r} ", Field.VAE: f"vae_name {vae_name!r} "}
            advice = error.advice(dit_input="dit_name", vae_input="vae_name")
            return f"{files.get(error.field, '')}{error}" + (f" {advice}" if advice else ""), None

    def load(self, dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree, cfg_degree,
             ray_address, attention_backend="auto", compile="off", weights="auto"):
        problem, spec = self._resolve(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                                      cfg_degree, ray_address, attention_backend, compile, weights, plan=True)
        if problem:
            raise ValueError(problem)
        return (open_pool(spec),)


def degree_choice(value: int) -> int | None:
    """A degree widget's value for the resolver: 0 means automatic."""
    return None if value == AUTO_DEGREE else value
