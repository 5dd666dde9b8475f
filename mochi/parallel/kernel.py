"""The one attention kernel layer every Mochi attention call goes through.

Ring attention merges partial results block by block (online softmax) and needs the softmax
log-sum-exp beside the output: `attention_with_lse`. Without Ring, `attention` returns the output
alone. Both run the kernel named by `choose_backend`, a pure function of the device, the dtype and
what is installed (`InstalledKernels`, a snapshot the tests fake):

| kernel | where | dtypes | what it is |
|---|---|---|---|
| flash_attn_3 | CUDA, Hopper (9.x) | fp16, bf16 | FlashAttention-3 (`flash_attn_interface`, optional build) |
| flash_attn | CUDA, 8.0+ | fp16, bf16 | flash-attn 2 (optional build) |
| torch_cudnn | CUDA, 9.x / 10.x, cuDNN > 9.15 | fp16, bf16 | `aten._scaled_dot_product_cudnn_attention` |
| torch_flash | CUDA, 8.0+ | fp16, bf16 | `aten._scaled_dot_product_flash_attention` |
| torch_efficient | CUDA | fp32 (and fp16/bf16 before 8.0) | `aten._scaled_dot_product_efficient_attention` |
| cpu_flash | CPU | floating | `aten._scaled_dot_product_flash_attention_for_cpu` |
| math | elsewhere | any | explicit fp32 scores; refused on a GPU above `MATH_MAX_SCORE_BYTES` |
| xfuser | CUDA | — | xDiT's USP layer replaces ours whole (`xfuser_backend.py`), never a per-call kernel |

`auto` takes, for fp16/bf16 on CUDA, the first that applies: FlashAttention-3, cuDNN, flash-attn 2,
PyTorch's flash kernel (efficient before 8.0); fp32 runs the efficient kernel. An explicit
flash_attn / flash_attn_3 request is honoured for fp16/bf16 and falls back to PyTorch's kernels
for other dtypes. The torch kernels return the output and a fp32 log-sum-exp [B, H, Sq] and
allocate nothing of size S x S, like flash-attn. cuDNN is preferred on Hopper/Blackwell exactly
where PyTorch itself prefers it (`check_prefer_cudnn_attention` in PyTorch's sdp_utils: sm90 /
sm100 with cuDNN > 9.15, the release that fixed sequence lengths not divisible by 128).

The requested backend (`AttentionBackend`, the loader's `attention_backend` and the CLI's
`--attention`) travels as an `AttentionConfig` in the `ParallelContext` or as the DiT forward's
`attention` argument; nothing here is global. `backend_problem` says, before anything runs, why a
requested backend cannot run and what to install.
"""

import importlib
import importlib.util
import math
from dataclasses import dataclass, replace
from enum import Enum

import torch

aten = torch.ops.aten

HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
AMPERE = (8, 0)  # torch's flash kernel and flash-attn 2 need this compute capability or newer
CUDNN_PREFERRED_MAJORS = (9, 10)  # Hopper, Blackwell: where PyTorch prefers cuDNN attention
CUDNN_MIN_VERSION = 91500  # PyTorch prefers cuDNN attention only above this cuDNN version
HOPPER_MAJOR = 9  # FlashAttention-3 is built for Hopper only
MATH_MAX_SCORE_BYTES = 64 * 2**20  # the math path's fp32 score matrix allowed on a GPU (tests, tiny sizes)

FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"
FLASH_ATTN_3_INSTALL = (
    "pip install 'git+https://github.com/Dao-AILab/flash-attention.git#subdirectory=hopper' "
    "(a source build for Hopper GPUs)"
)
XFUSER_INSTALL = "pip install xfuser yunchang triton (or the pack's gpu extra: pip install 'comfyui-mochi-xdit[gpu]')"


class AttentionBackend(str, Enum):
    """What a user asks for (loader `attention_backend`, CLI `--attention`)."""

    AUTO = "auto"  # the fastest installed kernel for the device and dtype
    TORCH = "torch"  # PyTorch's own fused kernels only (nothing optional)
    FLASH_ATTN = "flash_attn"  # flash-attn 2 (fp16/bf16; PyTorch's kernels for other dtypes)
    FLASH_ATTN_3 = "flash_attn_3"  # FlashAttention-3 on Hopper (fp16/bf16; PyTorch's otherwise)
    XFUSER = "xfuser"  # xDiT's USP attention layer (CUDA, two or more ranks)

    @classmethod
    def parse(cls, value: "AttentionBackend | str") -> "AttentionBackend":
        """The member for a member or its value; a ValueError listing the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"attention_backend={value!r}; use one of {', '.join(b.value for b in cls)} "
                "('auto' picks the fastest installed kernel)"
            ) from None


class AttentionKernel(str, Enum):
    """The kernel an attention call runs (compares equal to its name)."""

    FLASH_ATTN_3 = "flash_attn_3"
    FLASH_ATTN = "flash_attn"
    TORCH_CUDNN = "torch_cudnn"
    TORCH_FLASH = "torch_flash"
    TORCH_EFFICIENT = "torch_efficient"
    CPU_FLASH = "cpu_flash"
    MATH = "math"
    XFUSER = "xfuser"


# What the planner runs on fake tensors for a kernel from an optional package: a PyTorch kernel
# with the same allocations (output [B, Sq, H, Dh] in the input dtype, fp32 LSE [B, H, Sq]).
_COUNTED_AS = {AttentionKernel.FLASH_ATTN_3: AttentionKernel.TORCH_FLASH,
               AttentionKernel.FLASH_ATTN: AttentionKernel.TORCH_FLASH}


def _importable(module: str, attribute: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attribute)
    except ImportError:
        return False


@dataclass(frozen=True)
class InstalledKernels:
    """What this process can run: optional packages and the GPU's capability. A value, so tests
    pass a fake one and `detect()` is the only place that looks at the machine.

    Args:
        flash_attn: flash-attn 2 imports (`flash_attn.flash_attn_func`).
        flash_attn_3: FlashAttention-3 imports (`flash_attn_interface.flash_attn_func`).
        xfuser: xfuser and yunchang are installed (found, not imported: xfuser's import needs a GPU).
        cuda_capability: (major, minor) of the current CUDA device; None without one (then a GPU is
            planned as Ampere or newer, without the Hopper-only choices).
        cudnn_version: torch.backends.cudnn.version() (e.g. 91600), None without cuDNN.
    """

    flash_attn: bool = False
    flash_attn_3: bool = False
    xfuser: bool = False
    cuda_capability: tuple[int, int] | None = None
    cudnn_version: int | None = None

    @classmethod
    def detect(cls) -> "InstalledKernels":
        """Look at this process's packages and current CUDA device."""
        capability = tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return cls(
            flash_attn=_importable("flash_attn", "flash_attn_func"),
            flash_attn_3=_importable("flash_attn_interface", "flash_attn_func"),
            xfuser=importlib.util.find_spec("xfuser") is not None and importlib.util.find_spec("yunchang") is not None,
            cuda_capability=capability,
            cudnn_version=cudnn,
        )


def backend_problem(
    requested: AttentionBackend | str,
    device_type: str,
    installed: InstalledKernels | None = None,
    world_size: int | None = None,
) -> str | None:
    """Why `requested` cannot run on `device_type` ranks, with what to install or choose instead;
    None when it can.

    Args:
        requested: the backend asked for.
        device_type: "cuda" or "cpu" (where the ranks run).
        installed: what the ranks have (default: this process, `InstalledKernels.detect()`).
        world_size: ranks of the pool, when known (xfuser needs two or more).
    """
    requested = AttentionBackend.parse(requested)
    if requested in (AttentionBackend.AUTO, AttentionBackend.TORCH):
        return None
    name = f"attention_backend={requested.value}"
    if device_type != "cuda":
        return (f"{name} runs on CUDA GPUs only, but the ranks run on {device_type}; use attention_backend=auto "
                "(PyTorch's kernels, the same results)")
    installed = InstalledKernels.detect() if installed is None else installed
    capability = installed.cuda_capability
    if requested is AttentionBackend.FLASH_ATTN:
        if not installed.flash_attn:
            return f"{name} needs the flash-attn package on every rank: {FLASH_ATTN_INSTALL}; or use attention_backend=auto"
        if capability is not None and capability < AMPERE:
            return (f"{name}: flash-attn 2 needs compute capability 8.0 or newer, this GPU has "
                    f"{capability[0]}.{capability[1]}; use attention_backend=auto")
    elif requested is AttentionBackend.FLASH_ATTN_3:
        if not installed.flash_attn_3:
            return (f"{name} needs FlashAttention-3 (flash_attn_interface) on every rank: {FLASH_ATTN_3_INSTALL}; "
                    "or use attention_backend=auto")
        if capability is not None and capability[0] != HOPPER_MAJOR:
            return (f"{name}: FlashAttention-3 runs on Hopper GPUs (compute capability 9.x), this GPU has "
                    f"{capability[0]}.{capability[1]}; use attention_backend=flash_attn or auto")
    elif requested is AttentionBackend.XFUSER:
        if not installed.xfuser:
            return f"{name} needs xfuser and yunchang on every rank: {XFUSER_INSTALL}; or use attention_backend=auto"
        if world_size is not None and world_size < 2:
            return (f"{name} is xDiT's multi-rank attention layer and needs two or more ranks (this pool has "
                    f"{world_size}); use attention_backend=auto on one GPU")
    return None


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    need_lse: bool,
    requested: AttentionBackend | str = AttentionBackend.AUTO,
    installed: InstalledKernels | None = None,
) -> AttentionKernel:
    """The kernel an attention call on `device_type` with `dtype` inputs runs.

    Args:
        device_type: "cuda", "cpu", or another torch device type (those get the math path).
        dtype: q/k/v dtype.
        need_lse: the caller merges partial results (Ring) and needs the log-sum-exp. Every per-call
            kernel here can return it, so today it does not change the answer; `attention` skips
            computing it where the kernel allows.
        requested: the user's backend. flash_attn / flash_attn_3 fall back to PyTorch's kernels for
            dtypes they do not take (fp32); xfuser answers "xfuser" (its layer replaces ours).
        installed: what this process has (default `InstalledKernels.detect()`).

    Raises:
        ValueError: the requested backend cannot run here (the message is `backend_problem`'s).
    """
    requested = AttentionBackend.parse(requested)
    installed = InstalledKernels.detect() if installed is None else installed
    problem = backend_problem(requested, device_type, installed)
    if problem is not None:
        raise ValueError(problem)
    if device_type == "cpu":
        return AttentionKernel.CPU_FLASH if dtype in CPU_FLASH_DTYPES else AttentionKernel.MATH
    if device_type != "cuda":
        return AttentionKernel.MATH
    if requested is AttentionBackend.XFUSER:
        return AttentionKernel.XFUSER
    capability = installed.cuda_capability
    half = dtype in HALF_DTYPES
    ampere_or_newer = capability is None or capability >= AMPERE
    if half:
        wants_fa3 = requested in (AttentionBackend.AUTO, AttentionBackend.FLASH_ATTN_3)
        wants_fa2 = requested in (AttentionBackend.AUTO, AttentionBackend.FLASH_ATTN)
        if wants_fa3 and installed.flash_attn_3 and capability is not None and capability[0] == HOPPER_MAJOR:
            return AttentionKernel.FLASH_ATTN_3
        if requested is AttentionBackend.FLASH_ATTN:  # backend_problem checked it is installed and usable
            return AttentionKernel.FLASH_ATTN
        cudnn_preferred = (capability is not None and capability[0] in CUDNN_PREFERRED_MAJORS
                           and installed.cudnn_version is not None and installed.cudnn_version > CUDNN_MIN_VERSION)
        if cudnn_preferred:  # faster than flash-attn 2 where PyTorch prefers it (Hopper, Blackwell)
            return AttentionKernel.TORCH_CUDNN
        if wants_fa2 and installed.flash_attn and ampere_or_newer:
            return AttentionKernel.FLASH_ATTN
        return AttentionKernel.TORCH_FLASH if ampere_or_newer else AttentionKernel.TORCH_EFFICIENT
    if dtype == torch.float32:
        return AttentionKernel.TORCH_EFFICIENT
    return AttentionKernel.MATH  # fp64 and other dtypes: refused at real sizes on a GPU


@dataclass(frozen=True)
class AttentionConfig:
    """How the model's attention calls pick their kernel; passed explicitly (ParallelContext, or the
    DiT forward's `attention` argument on one device).

    Args:
        backend: the requested backend.
        installed: what the ranks have; None detects it where the model runs (`resolved()`, once
            per forward).
        device_type: None runs the kernel for the tensors' own device. The planner sets "cuda" to
            count, on fake CPU tensors, the kernel a GPU would run (optional packages' kernels are
            counted as the PyTorch kernel with the same allocations); real CPU tensors cannot run
            CUDA kernels, so nothing else sets it.
    """

    backend: AttentionBackend = AttentionBackend.AUTO
    installed: InstalledKernels | None = None
    device_type: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "backend", AttentionBackend.parse(self.backend))
        if self.installed is not None and not isinstance(self.installed, InstalledKernels):
            raise TypeError(f"installed must be an InstalledKernels or None, got {type(self.installed)}")
        if self.device_type not in (None, "cpu", "cuda"):
            raise ValueError(f"device_type={self.device_type!r}; use None (the tensors' device), 'cpu' or 'cuda'")

    def resolved(self) -> "AttentionConfig":
        """This config with `installed` filled in (detected now when it is None)."""
        return self if self.installed is not None else replace(self, installed=InstalledKernels.detect())

    def kernel(self, q: torch.Tensor, need_lse: bool) -> AttentionKernel:
        """The kernel to run for these queries (see `choose_backend`)."""
        device_type = self.device_type or q.device.type
        kernel = choose_backend(device_type, q.dtype, need_lse, self.backend, self.installed)
        if device_type != q.device.type:  # planning another device's kernel on fake tensors
            kernel = _COUNTED_AS.get(kernel, kernel)
        return kernel


def _default_kernel(q: torch.Tensor, need_lse: bool) -> AttentionKernel:
    return choose_backend(q.device.type, q.dtype, need_lse)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    kernel: AttentionKernel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (non-causal) attention that also returns the log-sum-exp of the scores.

    Args:
        q: [B, H, Sq, Dh] queries (last dim contiguous).
        k: [B, H, Sk, Dh] keys (Sk may be 0: the output is then zero and lse is -inf).
        v: [B, H, Sk, Dh] values.
        scale: score scale, default 1 / sqrt(Dh).
        kernel: the kernel to run (from `AttentionConfig.kernel` or `choose_backend`); None chooses
            the automatic one for q's device and dtype.

    Returns:
        out: [B, H, Sq, Dh] in q's dtype.
        lse: [B, H, Sq] float32, log(sum_k exp(scale * q.k)).
    """
    return _run(q, k, v, scale, kernel if kernel is not None else _default_kernel(q, True), need_lse=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    kernel: AttentionKernel | None = None,
) -> torch.Tensor:
    """`attention_with_lse` without the log-sum-exp (one device, or USP without Ring): the kernels
    that can skip it (efficient, cuDNN) do. Same arguments; returns out [B, H, Sq, Dh]."""
    return _run(q, k, v, scale, kernel if kernel is not None else _default_kernel(q, False), need_lse=False)[0]


def kernel_for_keys(kernel: AttentionKernel, keys: int) -> AttentionKernel:
    """The kernel that runs a call with `keys` keys: cuDNN's attention refuses a single key
    (PyTorch's own dispatcher checks s_k != 1 before it picks cuDNN; calling the op directly skips
    that check), which a ring block holding one valid token reaches. Such a call runs PyTorch's flash
    kernel instead (cuDNN is chosen only on Hopper / Blackwell, where flash runs too; same output
    and log-sum-exp)."""
    if kernel is AttentionKernel.TORCH_CUDNN and keys == 1:
        return AttentionKernel.TORCH_FLASH
    return kernel


def _run(q, k, v, scale, kernel: AttentionKernel, need_lse: bool):
    B, H, Sq, Dh = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    if Sk == 0:
        return q.new_zeros(B, H, Sq, Dh), q.new_full((B, H, Sq), float("-inf"), dtype=torch.float32)
    kernel = kernel_for_keys(kernel, Sk)
    if kernel is AttentionKernel.CPU_FLASH:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
        return out, lse.float()
    if kernel is AttentionKernel.TORCH_FLASH:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse  # [B, H, Sq, Dh], [B, H, Sq] fp32
    if kernel is AttentionKernel.TORCH_EFFICIENT:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, need_lse, 0.0, False, scale=scale)[:2]
        return out, (lse[:, :, :Sq] if need_lse else None)  # the LSE comes padded to a multiple of 32 along Sq
    if kernel is AttentionKernel.TORCH_CUDNN:
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, need_lse, 0.0, False, False, scale=scale)[:2]
        return out, (lse.reshape(B, H, Sq).float() if need_lse else None)  # cuDNN's LSE is [B, H, Sq, 1]
    if kernel is AttentionKernel.FLASH_ATTN:
        from flash_attn import flash_attn_func

        # flash-attn takes [B, S, H, Dh]; with return_attn_probs it returns (out, lse [B, H, Sq], probs)
        out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      softmax_scale=scale, return_attn_probs=True)
        return out.transpose(1, 2), lse.float()
    if kernel is AttentionKernel.FLASH_ATTN_3:
        from flash_attn_interface import flash_attn_func

        # FlashAttention-3 (hopper/flash_attn_interface.py): [B, S, H, Dh]; return_attn_probs=True
        # returns (out, softmax_lse [B, H, Sq])
        out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   softmax_scale=scale, return_attn_probs=True)[:2]
        return out.transpose(1, 2), lse.float()
    if kernel is AttentionKernel.MATH:
        return _math_attention_with_lse(q, k, v, scale)
    raise ValueError(
        f"kernel {kernel!r} is not a per-call attention kernel (xfuser replaces the whole sequence-parallel "
        "layer and needs a ParallelContext built with attention_backend=xfuser)"
    )


def _math_attention_with_lse(q, k, v, scale):
    """Reference math path in fp32 (any dtype). Allocates [B, H, Sq, Sk] fp32 scores twice, so on a
    GPU it runs only up to MATH_MAX_SCORE_BYTES (a real video would need tens to hundreds of GB)."""
    B, H, Sq, Dh = q.shape
    score_bytes = B * H * Sq * k.shape[2] * 4
    if q.device.type != "cpu" and score_bytes > MATH_MAX_SCORE_BYTES:
        raise RuntimeError(
            f"attention in {q.dtype} on {q.device.type} has no fused kernel and the math path would allocate "
            f"{score_bytes / 2**30:.1f} GiB of scores ([{B}, {H}, {Sq}, {k.shape[2]}] fp32, twice); compute in "
            "bf16, fp16 or fp32 (PyTorch's fused kernels), e.g. the sampler's default compute dtype"
        )
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # [B, H, Sq, Sk]
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.float())  # [B, H, Sq, Dh]
    return out.to(q.dtype), lse


def merge_attention_partials(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets (online softmax).

    out = (exp(lse_a) * out_a + exp(lse_b) * out_b) / (exp(lse_a) + exp(lse_b)), written stably
    with a sigmoid (derivation: ring-flash-attention's `_update_out_and_lse`). Runs in fp32.

    Args:
        out, lse: running result [B, H, S, Dh] fp32 and [B, H, S] fp32, or None for the first block.
        block_out, block_lse: the new block's result, same shapes (any float dtype for block_out).

    Returns:
        The merged (out, lse), fp32.
    """
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)  # [B, H, S]; -inf + -inf stays -inf
    new_lse_safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    weight_old = torch.exp(lse - new_lse_safe)[..., None]  # [B, H, S, 1]
    weight_new = torch.exp(block_lse - new_lse_safe)[..., None]
    return out * weight_old + block_out * weight_new, new_lse
