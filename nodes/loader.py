"""MochiXDiTLoader: picks the Mochi files and the parallel layout, returns a pool handle.

The node only converts its widgets into a `workers.options.LoadChoices` and names the input an
`OptionsError` is about; the rules themselves are the resolver's, shared with the CLI.
"""

from . import checks
from .handle import POOL_TYPE
from .runs import open_pool

# The resolver's fields, as this node's inputs are called.
INPUT_NAMES = {"dit": "dit_name", "vae": "vae_name", "weight_dtype": "weight_dtype", "device": "device",
               "world_size": "world_size", "degrees": "", "cpu_threads": "cpu_threads", "ray_address": "ray_address",
               "attention_backend": "attention_backend", "lora": "lora_name", "cache": "cache", "weights": "weights"}


class MochiXDiTLoader:
    DESCRIPTION = (
        "Starts (or reuses) a pool of Ray workers, one per GPU rank, each loading the Mochi-1 DiT "
        "and VAE decoder itself. Replaces UNETLoader + VAELoader in the Mochi graph; the text "
        "encoder stays in ComfyUI (CLIPLoader type 'mochi'). The pool is reused while the files, "
        "dtype and degrees stay the same."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = (POOL_TYPE,)
    RETURN_NAMES = ("pool",)
    OUTPUT_TOOLTIPS = ("Handle of the rank pool holding the Mochi DiT and VAE; connect it to the sampler and decoder.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..workers.choices import ATTENTION_CHOICES, WEIGHT_DTYPE_CHOICES, WEIGHTS_CHOICES

        return {
            "required": {
                "dit_name": (checks.safetensors_names(checks.DIT_FOLDER), {
                    "tooltip": "Mochi-1 DiT weights (.safetensors) from models/diffusion_models/, e.g. "
                               "mochi_preview_bf16.safetensors or an fp8_scaled file."}),
                "vae_name": (checks.safetensors_names(checks.VAE_FOLDER), {
                    "tooltip": "Mochi VAE (.safetensors with the decoder) from models/vae/, e.g. mochi_vae.safetensors."}),
                "weight_dtype": (list(WEIGHT_DTYPE_CHOICES), {
                    "default": "auto",
                    "tooltip": "DiT weight precision on every rank. auto = bf16 on GPU, fp32 on CPU. fp8 "
                               "halves weight memory (about 10 GB instead of 20 GB) at a small quality cost; "
                               "fp32 doubles it; fp16 may overflow (Mochi was trained in bf16)."}),
                "world_size": ("INT", {
                    "default": 1, "min": 1, "max": checks.MAX_WORLD_SIZE, "step": 1,
                    "tooltip": "Number of ranks (one GPU each). Must equal cfg x ulysses x ring. More ranks: "
                               "faster steps and less memory per rank, more communication."}),
                "ulysses_degree": ("INT", {
                    "default": 0, "min": 0, "max": checks.MAX_WORLD_SIZE, "step": 1,
                    "tooltip": "Ranks splitting attention heads by all-to-all (must divide the 24 heads: 1, 2, 3, "
                               "4, 6, 8, 12, 24). Best inside one machine with fast links. 0 on all three "
                               "degrees = automatic: on a GPU machine the planner's fastest mix that fits "
                               "848x480x163 on this GPU, otherwise CFG split first, then Ulysses, then Ring. "
                               "0 on some degrees fills them in from the others."}),
                "ring_degree": ("INT", {
                    "default": 0, "min": 0, "max": checks.MAX_WORLD_SIZE, "step": 1,
                    "tooltip": "Ranks passing key/value blocks around a ring (any number). Use it for factors "
                               "Ulysses cannot take. 0 = automatic (what the other degrees leave)."}),
                "cfg_degree": ("INT", {
                    "default": 0, "min": 0, "max": 2, "step": 1,
                    "tooltip": "2 runs the positive and negative prompt on separate halves of the ranks "
                               "(nearly 2x, one small exchange per step; with cfg 1 the second half idles); 1 runs both on every rank. 0 = automatic (1 when other degrees "
                               "are set)."}),
                "ray_address": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Empty: start a private Ray on this machine (loopback only). Otherwise the "
                               "address of an existing Ray cluster ('auto', 'host:6379' or "
                               "'ray://host:10001', which needs ray[client]); it is probed before the "
                               "current pool is touched. Enable token auth on that cluster."}),
            },
            "optional": {
                "attention_backend": (list(ATTENTION_CHOICES), {
                    "default": "auto",
                    "tooltip": "Attention kernel on the ranks. auto: the fastest installed (FlashAttention-3 on "
                               "Hopper, cuDNN or flash-attn 2 where present, else PyTorch's own fused kernels). "
                               "torch: PyTorch's kernels only. flash_attn / flash_attn_3 / xfuser: refused at "
                               "queue time, with the install line, when not installed."}),
                "weights": (list(WEIGHTS_CHOICES), {
                    "default": "auto",
                    "tooltip": "Where the DiT's weights live. auto: replicated if the whole DiT fits a GPU with the "
                               "planner's margin, else sharded, else offload (the log says which and why). "
                               "replicated: every rank holds all of it (fastest). sharded: each of N ranks keeps "
                               "1/N of every block, gathered block by block (2+ ranks; for cards smaller than the "
                               "model). offload: blocks stream from host memory (one small GPU; nothing on CPU)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                        cfg_degree, ray_address, attention_backend="auto", weights="auto"):
        problem, _ = cls._resolve(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                                  cfg_degree, ray_address, attention_backend, weights, plan=False)
        return checks.refuse(problem)

    @staticmethod
    def _resolve(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree, cfg_degree,
                 ray_address, attention_backend, weights, plan: bool):
        """(message, None) for a bad input, else (None, PoolSpec). Reads the two files' headers;
        starts nothing (plan=True also asks the planner for automatic degrees on a local GPU)."""
        from ..workers.options import LoadChoices, OptionsError, resolve_load

        dit_path, problem = checks.resolve_model_file(dit_name, checks.DIT_FOLDER)
        if problem:
            return f"dit_name: {problem}", None
        vae_path, problem = checks.resolve_model_file(vae_name, checks.VAE_FOLDER)
        if problem:
            return f"vae_name: {problem}", None
        for name, value, low in (("world_size", world_size, 1), ("ulysses_degree", ulysses_degree, 0),
                                 ("ring_degree", ring_degree, 0), ("cfg_degree", cfg_degree, 0)):
            problem = checks.int_problem(name, value, low, checks.MAX_WORLD_SIZE)
            if problem:
                return problem, None
        if not isinstance(ray_address, str):
            return f"ray_address must be text, got {ray_address!r}", None
        choices = LoadChoices(
            dit_path=dit_path, vae_path=vae_path, weight_dtype=weight_dtype, world_size=world_size,
            cfg=checks.degree_choice(cfg_degree), ulysses=checks.degree_choice(ulysses_degree),
            ring=checks.degree_choice(ring_degree), ray_address=ray_address, attention=attention_backend,
            weights=weights,
        )
        try:
            return None, resolve_load(choices, plan=plan)
        except OptionsError as error:
            files = {"dit": f"dit_name {dit_name!r} ", "vae": f"vae_name {vae_name!r} "}  # others name themselves
            advice = error.advice(dit_input="dit_name", vae_input="vae_name")
            return f"{files.get(error.field.value, '')}{error}" + (f" {advice}" if advice else ""), None

    def load(self, dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree, cfg_degree,
             ray_address, attention_backend="auto", weights="auto"):
        problem, spec = self._resolve(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                                      cfg_degree, ray_address, attention_backend, weights, plan=True)
        if problem:
            raise ValueError(problem)
        return (open_pool(spec),)
