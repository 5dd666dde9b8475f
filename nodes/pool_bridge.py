"""The nodes' one door into `workers/`: the pool handle, progress/interrupt plumbing, and error
messages a ComfyUI user can act on.

The handle carries the pool's spec, not the pool: ComfyUI caches the loader's output across
prompts, while the pool behind it may be rebuilt (after a rank died, or when another loader asked
for other files). Every run looks the pool up again by spec; an unchanged spec reuses the live pool.
"""

import re
from dataclasses import dataclass

import torch

from ..mochi.latent import to_model_space
from ..mochi.text import TextCondition

POOL_TYPE = "MOCHI_XDIT_POOL"
# torch's messages for CUDA and CPU allocation failures (a rank's error text travels in PoolError)
OOM_PATTERN = re.compile(r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|"
                         r"DefaultCPUAllocator: can't allocate memory|MemoryError")
OOM_ADVICE = (
    "Give the pool more ranks (world_size, with ulysses/ring degrees), use weight_dtype fp8, a smaller "
    "video (fewer frames or pixels), or smaller decode tiles."
)


@dataclass(frozen=True)
class PoolHandle:
    """What flows along a MOCHI_XDIT_POOL link: the spec of the pool (files, dtype, degrees).

    Args:
        spec: `workers.protocol.PoolSpec`.
    """

    spec: object

    def __repr__(self):
        spec = self.spec
        return f"MochiXDiTPool({spec.parallel}, {spec.weight_dtype}, {spec.device})"


def pool_device() -> str:
    """Where the ranks run: one GPU each when this machine has CUDA, else CPU ranks."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_weight_dtype(weight_dtype: str, device: str) -> str:
    if weight_dtype != "auto":
        return weight_dtype
    return "bf16" if device == "cuda" else "fp32"


def open_pool(dit_path: str, vae_path: str, weight_dtype: str, parallel, ray_address: str | None) -> PoolHandle:
    """Build (or reuse) the pool for these files and degrees; weights are loaded before returning."""
    from ..workers.pool import acquire_pool
    from ..workers.protocol import PoolSpec

    device = pool_device()
    spec = PoolSpec(dit_path=dit_path, vae_path=vae_path, weight_dtype=resolve_weight_dtype(weight_dtype, device),
                    parallel=parallel, device=device, ray_address=ray_address)
    with user_errors():
        acquire_pool(spec)
    return PoolHandle(spec)


class ProgressReporter:
    """ComfyUI's progress bar for one sampling run; create it inside the node's method (the bar
    captures ComfyUI's hook, which knows the running node, at creation).

    `__call__(report)` is the pool's per-step callback. When the user pressed Cancel it raises
    ComfyUI's InterruptProcessingException (so does the bar's hook, an interruption point); the
    pool then cancels the run on every rank and re-raises it, and ComfyUI reports the node as
    interrupted.
    """

    def __init__(self, steps: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(steps)
        self.wants_preview = previews_enabled()

    def __call__(self, report) -> bool:
        import comfy.model_management as management

        management.throw_exception_if_processing_interrupted()
        preview = latent_preview(report.preview) if report.preview is not None else None
        self.bar.update_absolute(report.index + 1, report.total, preview)
        return True


def previews_enabled() -> bool:
    """ComfyUI's --preview-method (default none): previews cost a little time each step."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    method = getattr(args.preview_method, "value", args.preview_method)
    return str(method) != "none"


def latent_preview(vae_latent: torch.Tensor):
    """Rank 0's small VAE-space preview latent -> ComfyUI preview tuple (Latent2RGB on model space)."""
    from .comfy_types import preview_image

    latent = vae_latent.float()
    while latent.dim() < 5:  # [12, h, w] or [12, T, h, w] -> [1, 12, T, h, w]
        latent = latent.unsqueeze(0) if latent.dim() == 4 else latent.unsqueeze(1)
    return preview_image(to_model_space(latent), _preview_size())


def _preview_size() -> int:
    try:
        from comfy.cli_args import args

        return int(args.preview_size)
    except Exception:  # ComfyUI absent (tests, CLI): its default
        return 512


def run_sample(handle: PoolHandle, positive: TextCondition, negative: TextCondition, samples: torch.Tensor, *,
               seed: int, steps: int, cfg: float, schedule: str, denoise: float,
               progress: ProgressReporter) -> torch.Tensor:
    """Sample on the pool; returns VAE-space samples [B, 12, T, H, W] float32 on CPU."""
    from ..mochi.sampler import SampleRequest
    from ..workers.pool import acquire_pool

    problem = layout_problem(handle, cfg, tuple(samples.shape))
    if problem:
        raise ValueError(problem)
    request = SampleRequest(positive=positive, negative=negative, init_latent=samples, seed=seed, steps=steps,
                            cfg=cfg, schedule=schedule, denoise=denoise)
    with user_errors():
        pool = acquire_pool(handle.spec)
        return pool.sample(request, progress, preview=progress.wants_preview).to("cpu", torch.float32)


def layout_problem(handle: PoolHandle, cfg: float, latent_shape: tuple[int, ...]) -> str | None:
    """Requests the pool's layout cannot run; checked here so a user error never costs the pool."""
    from ..mochi.constants import PATCH_SIZE

    parallel = handle.spec.parallel
    if parallel.cfg_degree == 2 and cfg == 1.0:
        return (
            "cfg is 1, so there is no negative pass for the second half of the ranks (cfg_degree=2); raise "
            "cfg above 1, or set the loader's cfg_degree to 1 (ulysses/ring take the ranks)"
        )
    T, H, W = latent_shape[-3:]
    tokens = T * (H // PATCH_SIZE) * (W // PATCH_SIZE)
    if tokens < parallel.sp_degree:
        return (
            f"the video has {tokens} tokens but the pool splits them over {parallel.sp_degree} sequence ranks "
            f"(ulysses x ring); make the video larger or use fewer ulysses/ring ranks"
        )
    return None


def run_decode(handle: PoolHandle, samples: torch.Tensor, tiles) -> torch.Tensor:
    """Decode VAE-space samples [B, 12, T, H, W] on the pool -> video [B, 3, 6T-5, 8H, 8W] in [-1, 1].
    tiles: a `mochi.vae_tiling.TileSpec`, or None for the automatic choice."""
    from ..workers.pool import acquire_pool

    with user_errors():
        pool = acquire_pool(handle.spec)
        return pool.decode(samples, tiles)


class user_errors:
    """Turn the pool's failures into messages that say what to change."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None:
            return False
        from ..workers.protocol import PoolError

        text = str(error)
        if isinstance(error, torch.OutOfMemoryError) or OOM_PATTERN.search(text):
            raise MemoryError(f"Mochi xDiT: out of memory: {text}\n{OOM_ADVICE}") from error
        if isinstance(error, PoolError):
            hint = f"\nIf that rank ran out of memory: {OOM_ADVICE}" if "died" in text else ""
            raise RuntimeError(f"Mochi xDiT pool: {text}{hint}") from error
        return False
