"""`choose_fp8_accumulation`: whether a pool's fp8 Linears use `_scaled_mm`'s fast accumulation,
decided once by measurement when the pool loads, never re-checked per call.

`use_fast_accum=True` lets Hopper's fp8 tensor cores keep accumulating with fewer bits between
rescales into fp32: faster, less exact. It is used only where it keeps the fp8 product's tolerance,
`layers.within_fp8_rounding` (the bound `bench/gpu_acceptance.py` reports). A rank whose DiT has
fp8-stored Linears that multiply by `_scaled_mm` on its device (`layers.fp8_compute` is SCALED_MM:
CUDA compute capability 8.9+ with bf16/fp16 activations) takes two of block 0's fp8 Linears, the
longest accumulation and the largest weight (Mochi's visual MLP down and up projections),
multiplies `MEASURE_ROWS` rows of random activations with each with and without fast
accumulation, and compares each product with the exact product of the same fp8 operands (fp32: fp8
values times their scales, which the fp32 matmul holds exactly). Sharded weights (FSDP2) are
measured on this rank's own rows (the accumulation runs over the whole in_features there too), and
offloaded ones on a device copy, so every placement is measured without a gather.

The ranks then agree: each contributes refuse (0), accept (1) or nothing measured (2), and an
all-reduce MIN over the pool's group decides, so fast accumulation is used only when every rank
that measured accepted it and at least one did. Elsewhere (the CPU, the cast path, no fp8 weights,
fake or meta tensors) nothing is measured and it stays off. The result is set on every fp8 Linear
(`Linear.fast_accumulation`) and its one-line note goes to the log.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from .layers import (FP8, FP8_MATMUL_ALIGNMENT, Fp8Compute, Linear, fp8_compute, quantise_activations,
                     scaled_mm_linear, within_fp8_rounding)
from .parallel.collective import CollectiveLedger, collective

MEASURE_ROWS = 4096  # activation rows per measured product: a rank's share of a large video
REFUSE, ACCEPT, NO_OPINION = 0, 1, 2  # a rank's verdict; the MIN over the ranks decides


@dataclass(frozen=True)
class Fp8Accumulation:
    """A pool's fp8 accumulation, as chosen by `choose_fp8_accumulation` (one rank's copy).

    Args:
        fast: whether every fp8 Linear runs `_scaled_mm` with use_fast_accum.
        note: one line for the log: the choice and why (with this rank's measured errors).
        relative_errors: this rank's |y - exact| / |exact| (Frobenius norms, the largest over the
            measured Linears) without and with fast accumulation; None when it measured nothing.
    """

    fast: bool
    note: str
    relative_errors: tuple[float, float] | None = None


def fp8_linears(model: nn.Module) -> list[tuple[str, Linear]]:
    """(name, module) of every Linear with fp8-stored weights (a `scale_weight`), in module order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Linear) and module.scale_weight is not None]


def _first_block(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, module) where the measured Linears are: a DiT's `blocks[0]` (the visual
    projections and MLP, not the text embedder), else the whole module."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return "blocks.0.", blocks[0]
    return "", model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own plain tensor: a sharded DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def _not_measured_reason(linears, device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """Why this rank measures nothing, or None when it has fp8 Linears on the `_scaled_mm` path."""
    if not linears:
        return "no fp8-stored Linear weights"
    weight = _local(linears[0][1].weight)
    if is_fake(weight) or weight.device.type == "meta":
        return "the weights are fake or meta tensors (planning)"
    capability = _capability(device)
    if not any(fp8_compute(device.type, capability, FP8, compute_dtype, linear.in_features, linear.out_features)
               is Fp8Compute.SCALED_MM for _, linear in linears):
        dtype = str(compute_dtype).removeprefix("torch.")
        return (f"fp8 weights multiply by casting on {device.type} (capability {capability}, {dtype} activations); "
                "_scaled_mm needs CUDA compute capability 8.9+ and bf16/fp16 activations")
    return None


def _measured_linears(linears, device: torch.device, compute_dtype: torch.dtype) -> list[tuple[str, Linear]]:
    """Of the fp8 Linears on the `_scaled_mm` path: the longest accumulation (largest in_features:
    the rounding error grows with it) and the largest weight (the costliest GEMM), the first of
    each in module order; one Linear when it is both."""
    capability = _capability(device)
    runs_scaled_mm = [(name, linear) for name, linear in linears
                      if fp8_compute(device.type, capability, FP8, compute_dtype, linear.in_features,
                                     linear.out_features) is Fp8Compute.SCALED_MM]
    if not runs_scaled_mm:
        return []
    longest = max(runs_scaled_mm, key=lambda item: item[1].in_features)
    largest = max(runs_scaled_mm, key=lambda item: item[1].in_features * item[1].out_features)
    return [longest] if largest is longest else [longest, largest]


def _relative_error(product: torch.Tensor, exact: torch.Tensor) -> float:
    return ((product.float() - exact).norm() / exact.norm().clamp(min=1e-30)).item()


def _measure(linear: Linear, device: torch.device, compute_dtype: torch.dtype, rows: int, scaled_mm,
             generator: torch.Generator) -> tuple[tuple[float, float], tuple[bool, bool], list[int]] | None:
    """((relative error exact, fast), (exact within, fast within), [rows, N, K]) for one Linear, or
    None when this rank holds fewer than 16 of its weight rows (a small shard)."""
    weight = _local(linear.weight).to(device)  # [N_local, K] fp8: the resident shard, or a device copy
    kept = weight.shape[0] // FP8_MATMUL_ALIGNMENT * FP8_MATMUL_ALIGNMENT  # _scaled_mm needs N % 16 == 0
    if kept == 0:
        return None
    weight = weight[:kept]  # [N', K]
    scale = linear.scale_weight.to(device).float()
    x = torch.randn(rows, weight.shape[1], generator=generator, device=device).to(compute_dtype)  # [M, K]
    quantised, scale_x = quantise_activations(x)  # [M, K] fp8, the same operand scaled_mm_linear makes
    activations = quantised.float() * scale_x  # [M, K] fp32, exact
    dequantised = weight.float() * scale  # [N', K] fp32
    exact = (quantised.float() @ weight.float().T) * (scale_x * scale)  # [M, N'] fp32: fp8 values are exact there
    errors, within = [], []
    for fast in (False, True):
        product = scaled_mm_linear(x, weight, scale, None, fast, scaled_mm)  # [M, N'] compute dtype
        errors.append(_relative_error(product, exact))
        within.append(within_fp8_rounding(product, exact, activations, dequantised, compute_dtype))
    return (errors[0], errors[1]), (within[0], within[1]), [rows, kept, weight.shape[1]]


def _agree(verdict: int, group, device: torch.device, ledger: CollectiveLedger | None) -> int:
    """The smallest verdict over the group's ranks (this rank's alone without a group)."""
    if group is None or dist.get_world_size(group) <= 1:
        return verdict
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    reduced = torch.tensor([verdict], dtype=torch.int64, device=on)
    with collective("fp8 accumulation choice", ledger):
        dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=group)
    return int(reduced.item())


def _measure_here(candidates, device: torch.device, compute_dtype: torch.dtype, rows: int, scaled_mm,
                  seed: int) -> tuple[int, tuple[float, float] | None, str]:
    """(verdict, worst relative errors exact / fast or None, what was measured) on this rank; the
    verdict is NO_OPINION when no candidate had 16 rows here."""
    generator = torch.Generator(device=device).manual_seed(seed)
    measured, worst, fast_within, problems = [], [0.0, 0.0], True, []
    with torch.no_grad():
        for name, linear in _measured_linears(candidates, device, compute_dtype):
            try:
                found = _measure(linear, device, compute_dtype, rows, scaled_mm, generator)
            except Exception as error:  # noqa: BLE001 - probing: any failure refuses fast accumulation
                lines = str(error).strip().splitlines()
                problems.append(f"{name} raised {type(error).__name__}: {lines[0] if lines else ''}"[:200])
                fast_within = False
                continue
            if found is None:
                continue
            (exact_error, fast_error), (exact_ok, fast_ok), (M, N, K) = found
            measured.append(f"{name} [{M}x{K} @ {K}x{N}]")
            worst = [max(worst[0], exact_error), max(worst[1], fast_error)]
            fast_within = fast_within and fast_ok
            if not exact_ok:
                problems.append(f"{name} without fast accumulation is outside it too (check the GPU driver)")
    if not measured and not problems:
        return NO_OPINION, None, ""
    errors = (worst[0], worst[1]) if measured else None
    summary = f"{', '.join(measured)}: relative error {worst[0]:.2e} exact, {worst[1]:.2e} fast" if measured else ""
    return ACCEPT if fast_within else REFUSE, errors, "; ".join(filter(None, (summary, *problems)))


def _note(agreed: int, verdict: int, reason: str | None, here: str) -> str:
    """The log line: the agreed choice, and this rank's measurement or why it had none."""
    if agreed == NO_OPINION:
        return f"fp8 accumulation exact (not measured: {reason})"
    fast = agreed == ACCEPT
    if reason is not None:  # only other ranks measured
        return (f"fp8 accumulation {'fast' if fast else 'exact'} (measured on other ranks: fast accumulation "
                f"{'within' if fast else 'outside'} fp8's input rounding; not here: {reason})")
    if fast:
        return (f"fp8 accumulation fast (_scaled_mm use_fast_accum: within fp8's input rounding on every rank; "
                f"here {here})")
    if verdict == REFUSE:
        return f"fp8 accumulation exact (fast accumulation outside fp8's input rounding here: {here})"
    return (f"fp8 accumulation exact (fast accumulation outside fp8's input rounding on another rank; "
            f"within it here: {here})")


def choose_fp8_accumulation(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype,
                            group=None, ledger: CollectiveLedger | None = None,
                            scaled_mm: Callable | None = None, rows: int | None = None,
                            seed: int = 0) -> Fp8Accumulation:
    """Measure (where fp8 runs `_scaled_mm` here), agree over `group`, and set every fp8 Linear's
    `fast_accumulation`; see the module docstring. Call it on every rank of `group` at the same
    point (it is one collective there, measured or not), after the weights are placed.

    Args:
        model: the rank's DiT (or any module holding `layers.Linear`s), weights placed.
        device: where the rank computes.
        compute_dtype: the activations' dtype there (bf16 on a GPU).
        group: the process group whose ranks must agree (the pool's); None alone.
        ledger: counts the collective (the pool's `ParallelContext.collectives`), or None.
        scaled_mm: the fp8 matmul (None: torch._scaled_mm; tests pass fakes).
        rows: activation rows per measured product (None: MEASURE_ROWS).
        seed: of the random activations.

    Returns:
        The Fp8Accumulation (its note is for the log).
    """
    device = torch.device(device)
    prefix, first = _first_block(model)
    candidates = [(prefix + name, linear) for name, linear in fp8_linears(first)]
    reason = _not_measured_reason(candidates, device, compute_dtype)
    verdict, errors, here = NO_OPINION, None, ""
    if reason is None:
        verdict, errors, here = _measure_here(candidates, device, compute_dtype,
                                              MEASURE_ROWS if rows is None else rows, scaled_mm, seed)
        if verdict == NO_OPINION:
            reason = "this rank holds fewer than 16 rows of each measured fp8 weight"
    agreed = _agree(verdict, group, device, ledger)
    for _, linear in fp8_linears(model):
        linear.fast_accumulation = agreed == ACCEPT
    return Fp8Accumulation(agreed == ACCEPT, _note(agreed, verdict, reason, here), errors)
