"""MochiXDiTLoader: picks the Mochi files and the parallel layout, returns a pool handle."""

import re

from . import checks
from .pool_bridge import POOL_TYPE, open_pool, pool_device, resolve_weight_dtype

RAY_ADDRESS_PATTERN = re.compile(r"^(auto|(ray://)?[A-Za-z0-9.\-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5})$")


def ray_address_problem(address) -> str | None:
    if not isinstance(address, str):
        return f"ray_address must be text, got {address!r}"
    if address.strip() and not RAY_ADDRESS_PATTERN.match(address.strip()):
        return (
            f"ray_address {address!r} is not a Ray address; leave it empty (a private Ray on this machine), "
            "or give 'auto', 'host:6379' or 'ray://host:10001'"
        )
    return None


def local_gpu_problem(world_size: int, ray_address: str) -> str | None:
    """Without a cluster, GPU ranks need one local GPU each (CPU-only machines run CPU ranks)."""
    import torch

    if ray_address.strip() or not torch.cuda.is_available():
        return None
    gpus = torch.cuda.device_count()
    if world_size > gpus:
        return (
            f"world_size={world_size} but this machine has {gpus} GPU(s) and no ray_address is set; "
            f"use world_size <= {gpus} or give the address of a Ray cluster with more GPUs"
        )
    return None


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
        return {
            "required": {
                "dit_name": (checks.safetensors_names(checks.DIT_FOLDER), {
                    "tooltip": "Mochi-1 DiT weights (.safetensors) from models/diffusion_models/, e.g. "
                               "mochi_preview_bf16.safetensors or an fp8_scaled file."}),
                "vae_name": (checks.safetensors_names(checks.VAE_FOLDER), {
                    "tooltip": "Mochi VAE (.safetensors with the decoder) from models/vae/, e.g. mochi_vae.safetensors."}),
                "weight_dtype": (list(checks.WEIGHT_DTYPES), {
                    "default": "auto",
                    "tooltip": "DiT weight precision on every rank. auto = bf16 on GPU, fp32 on CPU. fp8 "
                               "halves weight memory (about 10 GB instead of 20 GB) at a small quality cost; "
                               "fp32 doubles it."}),
                "world_size": ("INT", {
                    "default": 1, "min": 1, "max": checks.MAX_WORLD_SIZE, "step": 1,
                    "tooltip": "Number of ranks (one GPU each). Must equal cfg x ulysses x ring. More ranks: "
                               "faster steps and less memory per rank, more communication."}),
                "ulysses_degree": ("INT", {
                    "default": 0, "min": 0, "max": checks.MAX_WORLD_SIZE, "step": 1,
                    "tooltip": "Ranks splitting attention heads by all-to-all (must divide the 24 heads: 1, 2, 3, "
                               "4, 6, 8, 12, 24). Best inside one machine with fast links. 0 on all three "
                               "degrees = automatic: on a GPU machine the planner's fastest mix that fits "
                               "848x480x163 on this GPU, otherwise CFG split first, then Ulysses, then Ring."}),
                "ring_degree": ("INT", {
                    "default": 0, "min": 0, "max": checks.MAX_WORLD_SIZE, "step": 1,
                    "tooltip": "Ranks passing key/value blocks around a ring (any number). Use it for factors "
                               "Ulysses cannot take. 0 = automatic (then all three degrees must be 0)."}),
                "cfg_degree": ("INT", {
                    "default": 0, "min": 0, "max": 2, "step": 1,
                    "tooltip": "2 runs the positive and negative prompt on separate halves of the ranks "
                               "(nearly 2x, one small exchange per step); 1 runs both on every rank. "
                               "0 = automatic (then all three degrees must be 0)."}),
                "ray_address": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Empty: start a private Ray on this machine (loopback only). Otherwise the "
                               "address of an existing Ray cluster ('auto', 'host:6379' or "
                               "'ray://host:10001'); enable token auth on that cluster."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                        cfg_degree, ray_address):
        problem, _ = cls._plan(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                               cfg_degree, ray_address)
        return problem or True

    @staticmethod
    def _plan(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree, cfg_degree, ray_address):
        """(message, None) for a bad input, else (None, (dit path, vae path, ParallelConfig)).
        Reads the two files' headers; starts nothing."""
        dit_path, problem = checks.resolve_model_file(dit_name, checks.DIT_FOLDER)
        if problem:
            return f"dit_name: {problem}", None
        vae_path, problem = checks.resolve_model_file(vae_name, checks.VAE_FOLDER)
        if problem:
            return f"vae_name: {problem}", None
        num_heads, problem = checks.dit_file_problem(dit_path, dit_name)
        problem = (problem or checks.vae_file_problem(vae_path, vae_name)
                   or checks.choice_problem("weight_dtype", weight_dtype, checks.WEIGHT_DTYPES)
                   or checks.degrees_problem(world_size, ulysses_degree, ring_degree, cfg_degree, num_heads)
                   or ray_address_problem(ray_address) or local_gpu_problem(world_size, ray_address))
        if problem:
            return problem, None
        parallel = checks.parallel_config(world_size, ulysses_degree, ring_degree, cfg_degree, num_heads)
        return None, (dit_path, vae_path, parallel)

    def load(self, dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree, cfg_degree,
             ray_address):
        problem, plan = self._plan(dit_name, vae_name, weight_dtype, world_size, ulysses_degree, ring_degree,
                                   cfg_degree, ray_address)
        if problem:
            raise ValueError(problem)
        dit_path, vae_path, parallel = plan
        if (ulysses_degree, ring_degree, cfg_degree) == (checks.AUTO_DEGREE,) * 3:
            device = pool_device()
            parallel = checks.planned_parallel_config(parallel, dit_path, resolve_weight_dtype(weight_dtype, device),
                                                      device, ray_address)
        return (open_pool(dit_path, vae_path, weight_dtype, parallel, ray_address.strip() or None),)
