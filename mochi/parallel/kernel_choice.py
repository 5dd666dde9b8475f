"""`KernelChoice`: the attention kernel a pool runs, chosen once by measurement, not by version rules.

`choose_backend` guesses from versions and capabilities; the guess is only the order to try here.
At the first attention call of a shape class (device, dtype, head dim, whether the log-sum-exp is
needed) each rank takes that call's own q, k, v (the real [B, heads, S, Dh] shape) and, for every
kernel it has (`candidate_kernels`):

1. checks it against the fp32 math path on a small slice (a few queries of one head): a kernel
   that raises (an older FlashAttention-3 build raises TypeError, a shape a kernel does not take
   raises RuntimeError) or disagrees is never chosen;
2. times it on the full call (one warm-up, then the fastest of a few runs).

The ranks then agree: every rank contributes one time per kernel (inf where it failed there, 0
where it had nothing to measure) and the element-wise maximum over the pool's group decides, so
all ranks run the same kernel and a kernel that fails on any rank is out. The fastest is kept for
the object's life: a rank builds one `KernelChoice` for its pool and every later call of that class
reads the dictionary. Because the agreement is collective, every rank of the group must reach the
first call of a class together; a rank that runs no attention at that moment (the unconditional
CFG rank at a cfg-1 step) calls `join` instead (`guidance.GuidedDiT.exchange` does).

Without `measure` (tests, the planner's fake tensors, a bare DiT call) the guess is used as is.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from .collective import collective
from .kernel import (
    AMPERE,
    CPU_FLASH_DTYPES,
    HALF_DTYPES,
    HOPPER_MAJOR,
    MATH_MAX_SCORE_BYTES,
    AttentionBackend,
    AttentionConfig,
    AttentionKernel,
    InstalledKernels,
    attention,
    attention_with_lse,
    choose_backend,
)

logger = logging.getLogger(__name__)

K = AttentionKernel
KERNEL_ORDER = tuple(AttentionKernel)  # the layout of the timing vector the ranks reduce
CHECK_QUERIES = 64  # the correctness slice: this many queries of one head ...
CHECK_KEYS = 512  # ... over this many keys
TIMED_RUNS = 3  # timed runs after one warm-up; the fastest counts
# Largest |kernel - fp32 reference| on the slice, relative to max(1, max |reference|): a few
# roundings of the dtype's epsilon (bf16 2^-8, fp16 2^-11); a wrong kernel is off by O(1).
CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
CHECK_TOLERANCE_DEFAULT = 1e-4  # fp32, fp64

KernelRunner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionKernel, bool],
                        tuple[torch.Tensor, torch.Tensor | None]]


def run_kernel(q, k, v, kernel: AttentionKernel, need_lse: bool):
    """The model's own call of `kernel`: (out [B, H, Sq, Dh], lse [B, H, Sq] fp32 or None)."""
    if need_lse:
        return attention_with_lse(q, k, v, kernel=kernel)
    return attention(q, k, v, kernel=kernel), None


def candidate_kernels(device_type: str, dtype: torch.dtype, need_lse: bool,
                      requested: AttentionBackend | str = AttentionBackend.AUTO,
                      installed: InstalledKernels | None = None) -> tuple[AttentionKernel, ...]:
    """The kernels worth measuring for this device and dtype, `choose_backend`'s guess first.

    An explicit flash_attn / flash_attn_3 request (for fp16/bf16) is honoured: it is the only
    candidate (still checked). `torch` leaves out the optional packages. The math path comes last
    and is measured only where its S x S scores are small (`MATH_MAX_SCORE_BYTES`).

    Raises:
        ValueError: the requested backend cannot run here (`backend_problem`'s message).
    """
    requested = AttentionBackend.parse(requested)
    installed = InstalledKernels.detect() if installed is None else installed
    guess = choose_backend(device_type, dtype, need_lse, requested, installed)
    half = dtype in HALF_DTYPES
    if guess is K.XFUSER or (half and requested in (AttentionBackend.FLASH_ATTN, AttentionBackend.FLASH_ATTN_3)):
        return (guess,)
    if device_type == "cpu":
        pool = [K.CPU_FLASH] if dtype in CPU_FLASH_DTYPES else []
    elif device_type == "cuda":
        capability = installed.cuda_capability
        ampere_or_newer = capability is None or capability >= AMPERE
        pool = []
        if half and requested is AttentionBackend.AUTO:
            if installed.flash_attn_3 and capability is not None and capability[0] == HOPPER_MAJOR:
                pool.append(K.FLASH_ATTN_3)
            if installed.flash_attn and ampere_or_newer:
                pool.append(K.FLASH_ATTN)
        if half and ampere_or_newer:
            if installed.cudnn_version is not None:
                pool.append(K.TORCH_CUDNN)
            pool.append(K.TORCH_FLASH)
        pool.append(K.TORCH_EFFICIENT)
    else:
        pool = []
    pool.append(K.MATH)
    return (guess, *(kernel for kernel in pool if kernel is not guess))


@dataclass(frozen=True)
class KernelMeasurement:
    """What one shape class's measurement found (the log line; `bench/gpu_acceptance.py`'s JSON).

    Args:
        q_shape: [B, H, Sq, Dh] of the call it ran on (this rank's).
        keys: Sk of that call.
        dtype: q's dtype.
        need_lse: whether the class returns the log-sum-exp (Ring).
        seconds: per kernel that passed on every rank, the slowest rank's best time.
        rejected: this rank's reason per kernel left out (raised, wrong, too large to time).
        chosen: the kernel every rank runs from now on.
    """

    q_shape: tuple[int, ...]
    keys: int
    dtype: torch.dtype
    need_lse: bool
    seconds: dict
    rejected: dict
    chosen: AttentionKernel

    @property
    def flops(self) -> int:
        """4 * B * H * Sq * Sk * Dh: the two matmuls of this rank's call."""
        B, H, Sq, Dh = self.q_shape
        return 4 * B * H * Sq * self.keys * Dh

    def tflops(self, kernel: AttentionKernel) -> float | None:
        """The kernel's measured TFLOP/s on this rank's call (None when it was not timed)."""
        seconds = self.seconds.get(kernel)
        return None if not seconds else self.flops / seconds / 1e12

    def summary(self) -> str:
        """One line: the chosen kernel and every timed one's TFLOP/s, and what was left out."""
        timed = ", ".join(f"{kernel.value} {self.tflops(kernel):.3g}" for kernel in self.seconds)
        left_out = "; ".join(f"{kernel.value}: {reason}" for kernel, reason in self.rejected.items())
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"attention kernel {self.chosen.value} for q {list(self.q_shape)} x {self.keys} keys {dtype}"
                f"{' with lse' if self.need_lse else ''}: {self.tflops(self.chosen) or 0:.3g} TFLOP/s "
                f"(measured TFLOP/s: {timed or 'none'}{'; left out: ' + left_out if left_out else ''})")


def _shape_class(device_type: str, dtype: torch.dtype, head_dim: int, need_lse: bool) -> tuple:
    return device_type, dtype, head_dim, need_lse


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class KernelChoice:
    """The attention kernel per shape class for one pool (one rank's copy), chosen once.

    Args:
        config: the requested backend and the installed kernels (detected here when None).
        measure: True measures at the first call of a class (see the module docstring); False
            keeps `choose_backend`'s guess (also where nothing real can run: a planned device
            type, fake or meta tensors, xfuser).
        group: the process group whose ranks must agree (every rank of the pool); None alone.
        run: how a kernel is called (tests inject wrong or raising kernels); default the model's.
        report: where each measurement's one-line summary goes (default this module's logger at
            INFO; a pool's rank 0 prints it and hands it to the driver with the run's result).
    """

    def __init__(self, config: AttentionConfig | None = None, measure: bool = False, group=None,
                 run: KernelRunner = run_kernel, report: Callable[[str], None] = logger.info):
        config = AttentionConfig() if config is None else config
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"config must be a kernel.AttentionConfig, got {type(config)}")
        self.config = config.resolved()  # installed kernels detected once
        self.measure = measure
        self.group = group
        self.run = run
        self.report = report
        self._chosen: dict[tuple, AttentionKernel] = {}
        self.measurements: dict[tuple, KernelMeasurement] = {}  # per measured class, in order

    @property
    def backend(self) -> AttentionBackend:
        """The requested backend."""
        return self.config.backend

    @property
    def measures(self) -> bool:
        """Whether a first call measures (and may be collective)."""
        return self.measure and self.config.device_type is None and self.backend is not AttentionBackend.XFUSER

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool) -> AttentionKernel:
        """The kernel for this call: the class's choice, made now (measured on q, k, v) if this is
        the class's first call. Every rank of `group` must call it at the same point (q or k may
        be empty on some: those ranks take part without timing).

        Args:
            q: [B, H, Sq, Dh]; k, v: [B, H, Sk, Dh], the call's real inputs (not modified).
            need_lse: the caller merges partial results (Ring).
        """
        key = _shape_class(self.config.device_type or q.device.type, q.dtype, q.shape[-1], need_lse)
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        if not self.measures or is_fake(q) or q.device.type == "meta":
            chosen = self._chosen[key] = self.config.kernel(q, need_lse)
            return chosen
        return self._measure(key, q, k, v, need_lse)

    def join(self, device_type: str, dtype: torch.dtype, head_dim: int, need_lse: bool) -> None:
        """Take part, without timing, in the measurement the group's other ranks run at their first
        call of this class (a rank with no attention call of its own at that moment); no-op once the
        class is chosen or when nothing is measured."""
        key = _shape_class(device_type, dtype, head_dim, need_lse)
        if key in self._chosen or not self.measures:
            return
        empty = torch.empty(1, 1, 0, head_dim, dtype=dtype, device=device_type)  # [B, H, 0, Dh]: no opinion
        self._measure(key, empty, empty, empty, need_lse)

    def _measure(self, key, q, k, v, need_lse) -> AttentionKernel:
        device_type, dtype = key[0], key[1]
        candidates = candidate_kernels(device_type, dtype, need_lse, self.backend, self.config.installed)
        seconds, rejected = {}, {}
        has_work = q.shape[2] > 0 and k.shape[2] > 0
        if has_work:
            seconds, rejected = self._time_candidates(q, k, v, need_lse, candidates)
        agreed = self._agree(seconds, has_work, q.device)
        if agreed is None:  # nobody had a call to time (cannot happen in the model): the guess
            chosen = candidates[0]
        elif not agreed:
            raise RuntimeError(
                f"no attention kernel ran correctly on every rank for {dtype} q {list(q.shape)} "
                f"(tried {', '.join(c.value for c in candidates)}; here: "
                f"{'; '.join(f'{c.value}: {r}' for c, r in rejected.items()) or 'all passed'}); "
                "check the GPU driver and the installed attention packages, or set attention_backend=torch"
            )
        else:
            chosen = min(agreed, key=lambda kernel: (agreed[kernel], KERNEL_ORDER.index(kernel)))
        self._chosen[key] = chosen
        if has_work:
            measurement = KernelMeasurement(tuple(q.shape), k.shape[2], dtype, need_lse, agreed or {}, rejected, chosen)
            self.measurements[key] = measurement
            self.report(measurement.summary())
        return chosen

    def _time_candidates(self, q, k, v, need_lse, candidates):
        """(seconds per kernel that passed the check, reason per kernel left out), on this rank."""
        B, H, Sq, Dh = q.shape
        Sk = k.shape[2]
        q_slice, k_slice, v_slice = q[:1, :1, :CHECK_QUERIES], k[:1, :1, :CHECK_KEYS], v[:1, :1, :CHECK_KEYS]
        expected_out, expected_lse = attention_with_lse(q_slice.float(), k_slice.float(), v_slice.float(),
                                                        kernel=K.MATH)  # fp32 reference
        tolerance = CHECK_TOLERANCE.get(q.dtype, CHECK_TOLERANCE_DEFAULT) * max(1.0, expected_out.abs().max().item())
        seconds, rejected = {}, {}
        for kernel in candidates:
            if kernel is K.MATH and B * H * Sq * Sk * 4 > MATH_MAX_SCORE_BYTES:
                rejected[kernel] = f"not timed: its fp32 scores would take {B * H * Sq * Sk * 4 / 2**20:.0f} MiB"
                continue
            try:
                out, lse = self.run(q_slice, k_slice, v_slice, kernel, need_lse)
                error = (out.float() - expected_out).abs().max().item()
                if need_lse:
                    error = max(error, (lse.float() - expected_lse).abs().max().item())
                if not error <= tolerance:  # also NaN
                    rejected[kernel] = f"wrong: off by {error:.3g} from the fp32 reference (allowed {tolerance:.3g})"
                    continue
                self.run(q, k, v, kernel, need_lse)  # warm-up (kernel selection, workspace)
                best = math.inf
                for _ in range(TIMED_RUNS):
                    _synchronize(q.device)
                    start = time.perf_counter()
                    self.run(q, k, v, kernel, need_lse)
                    _synchronize(q.device)
                    best = min(best, time.perf_counter() - start)
                seconds[kernel] = max(best, 1e-9)
            except Exception as error:  # noqa: BLE001 - probing: any failure means "not this kernel"
                lines = str(error).strip().splitlines()
                rejected[kernel] = f"raised {type(error).__name__}: {lines[0] if lines else ''}"[:200]
        return seconds, rejected

    def _agree(self, seconds: dict, has_work: bool, device: torch.device) -> dict | None:
        """Every rank's times reduced to the slowest (inf where a kernel failed anywhere): {kernel:
        seconds} of the kernels that passed everywhere; None when no rank had anything to time."""
        vector = torch.zeros(len(KERNEL_ORDER), dtype=torch.float64)  # 0: no opinion
        if has_work:
            vector.fill_(math.inf)
            for kernel, value in seconds.items():
                vector[KERNEL_ORDER.index(kernel)] = value
        if self.group is not None and dist.get_world_size(self.group) > 1:
            on = device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
            reduced = vector.to(on)
            with collective("attention kernel choice"):
                dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self.group)
            vector = reduced.cpu()
        if not (vector > 0).any():
            return None
        return {kernel: value for kernel, value in zip(KERNEL_ORDER, vector.tolist()) if math.isfinite(value)}
