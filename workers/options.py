"""Where a request is resolved: user choices in, a fully resolved `PoolSpec` out.

Both front doors (the CLI's flags, the loader node's widgets) only convert their inputs into a
`LoadChoices` and present the `OptionsError` they may get back; every rule lives here once: the
device, the weight dtype, the degrees (explicit, filled in, or the planner's choice on a local
GPU), the Ray address, whether the ranks fit, and which files are a Mochi DiT and VAE. Nothing
here starts Ray or a rank: resolving is cheap enough for ComfyUI's queue-time validation.
"""

import logging
from dataclasses import dataclass, field

from ..mochi.checkpoint import CheckpointError, inspect_checkpoint
from ..mochi.constants import DEFAULT_STEPS, PATCH_SIZE
from ..mochi.parallel.config import ParallelConfig, auto, largest_ulysses_degree
from .capacity import CapacityError, check_local_capacity
from ..mochi.weight_placement import WeightPlacement
from .choices import AUTO, DEVICE_CHOICES, WEIGHT_DTYPE_CHOICES, WEIGHTS_CHOICES
from .model_files import model_file_problem
from .option_table import Field
from .protocol import PoolSpec, Timeouts
from .ray_runtime import address_problem, resolve_address

logger = logging.getLogger(__name__)

# The video `auto` degrees are planned for when the video is not known yet (the loader node): the
# largest Mochi-1 video, so the chosen mix fits every smaller one too.
PLAN_VIDEO = (848, 480, 163)  # width, height, frames


class OptionsError(ValueError):
    """A choice that cannot work; `field` says which and the message what to change. For a model file
    in the wrong slot, `file_info` is what the file is: `advice(dit_input, vae_input)` adds where it
    belongs and what the slot needs, in the front door's own input names."""

    def __init__(self, field: Field, message: str, file_info=None):
        self.field, self.file_info = field, file_info
        super().__init__(message)

    def advice(self, dit_input: str, vae_input: str) -> str:
        if self.file_info is None:
            return ""
        return self.file_info.wrong_slot_advice(self.field.value, dit_input=dit_input, vae_input=vae_input)


@dataclass(frozen=True)
class LoadChoices:
    """What a user chose at a front door, before any rule applies.

    Args:
        dit_path, vae_path: the model files (vae_path None: a pool that never decodes).
        weight_dtype: "auto" (bf16 on GPU, fp32 on CPU) or one of mochi.checkpoint.WEIGHT_DTYPES.
        world_size: ranks.
        cfg, ulysses, ring: degrees; None = automatic (all None: the planner on a local GPU, else
            CFG split first, then the largest Ulysses degree, then Ring; some None: filled in).
        device: "auto" (cuda when this machine has a GPU), "cpu" or "cuda".
        cpu_threads: torch threads per CPU rank.
        ray_address: None/"" for a private Ray, else a cluster address (RAY_ADDRESS also counts).
        video: (width, height, frames) the run is for, when known; auto degrees are planned for it.
        steps: sampling steps, when known (the planner's time estimate).
        use_cfg: whether the runs will have an unconditional pass (cfg != 1).
        timeouts: per-verb deadlines.
        attention: "auto", "torch", "flash_attn", "flash_attn_3" or "xfuser" (checked against what
            this process has installed; the ranks check again, for clusters).
        compile: "off" or "on" (`mochi.dit.DiTCompile`: the ranks compile their DiT's blocks).
        weights: "auto" (replicated when the whole DiT fits a rank with the planner's margin, else
            sharded, else offload), "replicated", "sharded" or "offload" (mochi.weight_placement).
    """

    dit_path: str
    vae_path: str | None
    weight_dtype: str = AUTO
    world_size: int = 1
    cfg: int | None = None
    ulysses: int | None = None
    ring: int | None = None
    device: str = AUTO
    cpu_threads: int = 1
    ray_address: str | None = None
    video: tuple[int, int, int] = PLAN_VIDEO
    steps: int = DEFAULT_STEPS
    use_cfg: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    attention: str = AUTO
    compile: str = "off"
    weights: str = AUTO


def resolve_device(device: str) -> str:
    if device not in DEVICE_CHOICES:
        raise OptionsError(Field.DEVICE, f"device={device!r}; use one of {', '.join(DEVICE_CHOICES)}")
    if device != AUTO:
        return device
    return "cuda" if cuda_here() else "cpu"


def cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_weight_dtype(weight_dtype: str, device: str) -> str:
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        raise OptionsError(Field.WEIGHT_DTYPE,
                           f"weight_dtype={weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPE_CHOICES)}")
    if weight_dtype != AUTO:
        return weight_dtype
    return "bf16" if device == "cuda" else "fp32"


def dit_heads(path: str) -> int:
    """The attention heads of the Mochi DiT in `path` (header only); OptionsError for any other file."""
    try:
        info = inspect_checkpoint(path)
    except (CheckpointError, OSError) as error:
        raise OptionsError(Field.DIT, str(error)) from None
    heads = info.tensors.get(f"{info.dit_prefix}pos_frequencies") if info.kind == "dit" else None
    if heads is None or len(heads.shape) != 3:
        raise OptionsError(Field.DIT, f"is {info.describe()}, not a Mochi-1 DiT.", file_info=info)
    return heads.shape[1]


def check_vae_file(path: str) -> None:
    """OptionsError unless `path` holds a Mochi VAE decoder (header only)."""
    try:
        info = inspect_checkpoint(path)
    except (CheckpointError, OSError) as error:
        raise OptionsError(Field.VAE, str(error)) from None
    if info.kind != "vae" or info.vae_decoder_prefix is None:
        raise OptionsError(Field.VAE, f"is {info.describe()}, not a Mochi VAE with a decoder.", file_info=info)


def video_tokens(width: int, height: int, frames: int) -> int:
    """DiT tokens per forward of a video: latent frames x (H/16) x (W/16)."""
    from ..mochi.sampler import latent_shape_for_video

    _, _, T, H, W = latent_shape_for_video(width, height, frames)
    return T * (H // PATCH_SIZE) * (W // PATCH_SIZE)


def resolve_degrees(world_size: int, cfg: int | None, ulysses: int | None, ring: int | None, num_heads: int,
                    num_tokens: int | None = None, use_cfg: bool = True) -> ParallelConfig:
    """The degree mix: all None = `config.auto`; some None = filled in (cfg 1, then the largest Ulysses
    degree for what is left, then Ring); ParallelConfig checks the result."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise OptionsError(Field.WORLD_SIZE, f"world_size={world_size!r}: need at least 1 rank")
    try:
        if cfg is None and ulysses is None and ring is None:
            return auto(world_size, num_heads, num_tokens, use_cfg)
        cfg = cfg or 1
        sp = max(1, world_size // cfg)  # a world not divisible by cfg is refused by ParallelConfig
        if ulysses is None and ring is None:
            ulysses = largest_ulysses_degree(sp, num_heads)
        if ulysses is None:
            ulysses = max(1, sp // ring)
        if ring is None:
            ring = max(1, sp // ulysses)
        return ParallelConfig(world_size, cfg, ulysses, ring, num_heads=num_heads)
    except ValueError as error:
        raise OptionsError(Field.DEGREES, str(error)) from None


def planned_degrees(parallel: ParallelConfig, choices: LoadChoices, dit_path: str, device: str,
                    weight_dtype: str) -> ParallelConfig:
    """All degrees automatic on a local GPU machine: the planner's fastest mix that fits this GPU for
    the video (counted on fake tensors from our own DiT code, a few seconds). CPU ranks and clusters
    (their GPU model is unknown here) keep `parallel`."""
    import torch

    if (choices.cfg, choices.ulysses, choices.ring) != (None, None, None):
        return parallel
    if device != "cuda" or not torch.cuda.is_available() or resolve_address(choices.ray_address) is not None:
        return parallel
    if weight_dtype not in ("bf16", "fp8"):
        return parallel
    from ..mochi.planner.plan import recommend
    from ..mochi.planner.hardware import gpu_from_device_name

    gpu = gpu_from_device_name(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
    width, height, frames = choices.video
    return recommend(parallel.world_size, width, height, frames, gpu=gpu, weight_dtype=weight_dtype,
                     steps=choices.steps, use_cfg=choices.use_cfg, config=dit_config(dit_path))


def resolve_weights(choices: LoadChoices, parallel: ParallelConfig, device: str, weight_dtype: str,
                    plan: bool = True) -> tuple[WeightPlacement, str]:
    """The weight placement and one line saying which and why.

    `auto` on a local GPU asks the planner for this mix and video (replicated if it fits with
    RESERVE_GB, else sharded, else offload); CPU ranks, clusters (their GPUs are unknown here) and
    unplanned resolution (queue-time validation) keep replicated."""
    if choices.weights not in WEIGHTS_CHOICES:
        raise OptionsError(Field.WEIGHTS, f"weights={choices.weights!r}; use one of {', '.join(WEIGHTS_CHOICES)}")
    if choices.weights != AUTO:
        placement = WeightPlacement(choices.weights)
        if placement is WeightPlacement.SHARDED and parallel.world_size < 2:
            raise OptionsError(Field.WEIGHTS, "weights='sharded' needs two or more ranks (each keeps 1/N of every "
                               "block); raise world_size, or use 'offload' on one GPU")
        return placement, f"weights={placement.value}, as chosen"
    replicated = WeightPlacement.REPLICATED
    if device != "cuda":
        return replicated, ("weights auto -> replicated: CPU ranks keep the weights in host memory (memory-mapped; "
                            "ranks share the file's pages where its dtype is kept)")
    import torch

    if resolve_address(choices.ray_address) is not None or not torch.cuda.is_available():
        return replicated, ("weights auto -> replicated: this pool's GPUs are not on this machine, so the planner "
                            "cannot size them; choose sharded or offload yourself for cards smaller than the DiT")
    if weight_dtype == "fp32" or not plan:
        return replicated, "weights auto -> replicated (not planned: fp32 weights or queue-time validation)"
    from ..mochi.planner.hardware import gpu_from_device_name

    gpu = gpu_from_device_name(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
    return auto_placement(choices, parallel, weight_dtype, gpu)


def auto_placement(choices: LoadChoices, parallel: ParallelConfig, weight_dtype: str, gpu):
    """`choose_placement` for these choices on this GPU, counting a GGUF DiT's Linear weights as the
    quantised bytes the ranks keep (activations as bf16 compute)."""
    from ..mochi.planner.placement import quantised_weight_split
    from ..mochi.planner.plan import choose_placement

    planner_dtype = "fp8" if weight_dtype == "fp8" else "bf16"  # fp16 stores as many bytes as bf16
    config = dit_config(choices.dit_path)
    info = inspect_checkpoint(choices.dit_path)
    split = quantised_weight_split(info, config.depth) if info.quantised else None
    width, height, frames = choices.video
    return choose_placement(parallel, width, height, frames, gpu, planner_dtype, steps=choices.steps,
                            use_cfg=choices.use_cfg, config=config, split=split)


def resolve_load(choices: LoadChoices, plan: bool = True, on_note=None) -> PoolSpec:
    """Apply every rule to the user's choices; raise OptionsError naming the choice and the fix.

    Args:
        plan: ask the planner for automatic degrees and weight placement on a local GPU (a few
            seconds); queue-time validation passes False and gets the same checks without it.
        on_note: called with the one line saying which weight placement was chosen and why (when
            planning); default: this module's logger at INFO (ComfyUI's log).
    """
    for name, path in (("dit", choices.dit_path), ("vae", choices.vae_path)):
        problem = None if path is None else model_file_problem(path)
        if problem:
            raise OptionsError(Field(name), problem)
    num_heads = dit_heads(choices.dit_path)
    if choices.vae_path is not None:
        check_vae_file(choices.vae_path)
    device = resolve_device(choices.device)
    weight_dtype = resolve_weight_dtype(choices.weight_dtype, device)
    if weight_dtype == "fp8" and inspect_checkpoint(choices.dit_path).quantised:
        raise OptionsError(Field.WEIGHT_DTYPE, "weight_dtype=fp8 with a GGUF DiT, which is already quantised; use "
                           "bf16, fp16 or fp32 (the dtype of its unquantised tensors and of the compute)")
    if not isinstance(choices.cpu_threads, int) or choices.cpu_threads < 1:
        raise OptionsError(Field.CPU_THREADS, f"cpu_threads={choices.cpu_threads!r}: need at least 1 thread per rank")
    address = (choices.ray_address or "").strip() or None
    problem = address_problem(address)
    if problem:
        raise OptionsError(Field.RAY_ADDRESS, problem)
    parallel = resolve_degrees(choices.world_size, choices.cfg, choices.ulysses, choices.ring, num_heads,
                               video_tokens(*choices.video), choices.use_cfg)
    if resolve_address(address) is None:
        if device == "cuda" and not cuda_here():
            raise OptionsError(Field.DEVICE, "device=cuda, but this machine has no CUDA GPU that torch can use "
                               "(torch.cuda.is_available() is False); use device auto or cpu here, or give the "
                               "ray_address of a GPU cluster")
        try:
            check_local_capacity(choices.world_size, device, choices.cpu_threads)
        except CapacityError as error:
            raise OptionsError(Field.WORLD_SIZE, str(error)) from None
    attention = resolve_attention(choices.attention, device, choices.world_size)
    compile = resolve_compile(choices.compile)
    if plan:
        parallel = planned_degrees(parallel, choices, choices.dit_path, device, weight_dtype)
    weights, why = resolve_weights(choices, parallel, device, weight_dtype, plan)
    check_compile_with_weights(compile, weights, device, why)
    if plan:
        (on_note or logger.info)(f"Mochi xDiT: {why}")
    return PoolSpec(dit_path=choices.dit_path, vae_path=choices.vae_path, weight_dtype=weight_dtype,
                    parallel=parallel, device=device, cpu_threads=choices.cpu_threads, ray_address=address,
                    timeouts=choices.timeouts, attention_backend=attention, compile=compile,
                    weights=weights)


def check_compile_with_weights(compile, weights, device: str, why: str) -> None:
    """Compiled regions are built on the block's own parameters, so they need them resident: refuse
    compile on with sharded weights (FSDP swaps the parameters per block) and with offload on a GPU."""
    from ..mochi.dit import DiTCompile
    from ..mochi.weight_placement import WeightPlacement

    if compile is DiTCompile.OFF or weights is WeightPlacement.REPLICATED:
        return
    if weights is WeightPlacement.OFFLOAD and device == "cpu":
        return  # offload changes nothing on CPU ranks
    raise OptionsError(Field.COMPILE, f"compile=on needs the DiT's weights on every rank, but {why}; set compile "
                       "to off, or weights to replicated on cards that hold the whole DiT")


def resolve_compile(requested: str):
    """`mochi.dit.DiTCompile` for "off" / "on"."""
    from ..mochi.dit import DiTCompile

    try:
        return DiTCompile.parse(requested)
    except ValueError as error:
        raise OptionsError(Field.COMPILE, str(error)) from None


def resolve_attention(requested: str, device: str, world_size: int):
    """The attention backend, refused with the install line when this machine cannot run it."""
    from ..mochi.parallel.kernel import AttentionBackend, backend_problem

    try:
        backend = AttentionBackend.parse(requested)
    except ValueError as error:
        raise OptionsError(Field.ATTENTION, str(error)) from None
    problem = backend_problem(backend, device, world_size=world_size)
    if problem:
        raise OptionsError(Field.ATTENTION, problem)
    return backend


def sequence_problem(parallel: ParallelConfig, latent_shape: tuple[int, ...]) -> str | None:
    """A video too small for the pool's sequence split (checked before the pool is used)."""
    T, H, W = latent_shape[-3:]
    tokens = T * (H // PATCH_SIZE) * (W // PATCH_SIZE)
    if T < 1:
        return f"the latent has {T} frames; Mochi needs at least 1 latent frame (a video of 1 + 6k frames)"
    if tokens < parallel.sp_degree:
        return (f"the video has {tokens} tokens but the pool splits them over {parallel.sp_degree} sequence ranks "
                "(ulysses x ring); make the video larger or use fewer ulysses/ring ranks")
    return None


def dit_config(dit_path: str):
    """The `mochi.dit.DiTConfig` of a DiT file, from its header's shapes."""
    from ..mochi.dit import DiTConfig

    info = inspect_checkpoint(dit_path)
    return DiTConfig.from_shapes({name: info.tensors[key].shape for name, key in info.dit_names().items()})


def resolve_lora(spec: PoolSpec, path: str, strength: float):
    """A `mochi.lora_files.LoraSpec` checked against the pool's DiT (format, modules, shapes; header
    only) and the strength against the option table (the LoRA node's limits), so a file that cannot
    work is refused before any rank reads it."""
    from ..mochi.lora_files import LoraError, LoraSpec, inspect_lora
    from .option_table import option, value_problem

    problem = value_problem(option("strength"), strength)
    if problem:
        raise OptionsError(Field.LORA, f"LoRA {problem}")
    try:
        lora = LoraSpec(path, strength)
        inspect_lora(lora.path, dit_config(spec.dit_path))
    except (LoraError, ValueError) as error:
        raise OptionsError(Field.LORA, str(error)) from None
    return lora
