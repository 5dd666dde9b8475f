"""Small building blocks shared by the DiT and the VAE: a Linear that stores weights in any
dtype (bf16, fp16, fp32, or fp8 with a per-tensor scale) and computes in the input's dtype,
optionally plus a low-rank (LoRA) addition at call time, and the RMS norms Mochi uses (fp32 accumulation).

fp8 weights compute in fp8 where the GPU has fp8 tensor cores (compute capability 8.9+: Ada,
Hopper, Blackwell): the activations are scaled per tensor into float8_e4m3fn and
`torch._scaled_mm` multiplies them with the stored fp8 weight, accumulating in fp32. Elsewhere the
weight is cast to the activations' dtype at call time. `fp8_compute` is the pure function that
decides.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores (torch._scaled_mm): Ada 8.9, Hopper 9.0, Blackwell
FP8_MATMUL_ALIGNMENT = 16  # _scaled_mm needs K and N divisible by 16
FP8_OUT_DTYPES = (torch.bfloat16, torch.float16)  # activations that may go through fp8
FP8_INPUT_ROUNDING = 2.0**-4  # relative rounding of a float8_e4m3fn value (3 mantissa bits)
ROUNDING_FLOOR = 1e-5  # absolute slack for outputs near zero


class Fp8Compute(str, Enum):
    """How a Linear with fp8-stored weights multiplies."""

    SCALED_MM = "scaled_mm"  # fp8 x fp8 on tensor cores (torch._scaled_mm), fp32 accumulation
    CAST = "cast"  # cast the weight to the activations' dtype and multiply in that dtype


def fp8_compute(
    device_type: str,
    capability: tuple[int, int] | None,
    weight_dtype: torch.dtype,
    input_dtype: torch.dtype = torch.bfloat16,
    in_features: int = FP8_MATMUL_ALIGNMENT,
    out_features: int = FP8_MATMUL_ALIGNMENT,
) -> Fp8Compute:
    """Which multiply a Linear runs.

    Args:
        device_type: where the activations are ("cuda", "cpu", ...).
        capability: the CUDA device's (major, minor), None off CUDA.
        weight_dtype: the stored weight's dtype (only float8_e4m3fn goes to fp8).
        input_dtype: the activations' dtype; fp32 activations keep full precision (cast path).
        in_features, out_features: the Linear's sizes (fp8 GEMMs need multiples of 16).
    """
    if weight_dtype != FP8 or device_type != "cuda" or capability is None or capability < FP8_MIN_CAPABILITY:
        return Fp8Compute.CAST
    if input_dtype not in FP8_OUT_DTYPES:
        return Fp8Compute.CAST
    if in_features % FP8_MATMUL_ALIGNMENT or out_features % FP8_MATMUL_ALIGNMENT:
        return Fp8Compute.CAST
    return Fp8Compute.SCALED_MM


def _capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def quantise_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax scaling into float8_e4m3fn (as ComfyUI's fp8_scaled files are made):
    returns (fp8 tensor, fp32 scalar scale) with tensor ~ fp8 * scale."""
    scale = (weight.float().abs().max() / FP8_MAX).clamp(min=1e-12)
    return (weight.float() / scale).to(FP8), scale.reshape(())


def activation_scale(rows: torch.Tensor) -> torch.Tensor:
    """The per-tensor fp8 scale of non-empty activations: the power of two at or above absmax / 448
    (fp32 scalar). Scaling by a power of two is exact in any float dtype, and absmax / scale stays
    below 448 * (1 + 2^-20), well under 480 where float8_e4m3fn overflows, so no clamp is needed."""
    absmax = torch.linalg.vector_norm(rows, ord=float("inf")).float().clamp(min=1e-30)  # one read, no |x| copy
    return torch.exp2(torch.ceil(torch.log2(absmax / FP8_MAX)))  # fp32 scalar, a power of two


def quantise_activations(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] bf16/fp16 (M > 0) -> ([M, K] float8_e4m3fn, fp32 scalar scale), rows ~ fp8 * scale.

    Two reads of x and one fp8 write: the absmax, then one fused multiply whose result is stored
    straight as fp8 (`mul(out=fp8)`: on CUDA TensorIterator casts inside the kernel, no temporary;
    the CPU builds a temporary in x's dtype, which only tests and the planner ever run)."""
    scale = activation_scale(rows)
    quantised = torch.empty(rows.shape, dtype=FP8, device=rows.device)  # [M, K]
    torch.mul(rows, 1.0 / scale, out=quantised)  # exact scaling, one rounding to fp8
    return quantised, scale


def within_fp8_rounding(product: torch.Tensor, reference: torch.Tensor, activations: torch.Tensor,
                        weight: torch.Tensor, output_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether an fp8 product stays within fp8's input rounding of `reference`, element by element:
    |product - reference| <= 2^-4 (|activations| @ |weight|^T) + r |reference| + 1e-5, r the
    rounding of `output_dtype` (bf16 2^-8). It is what `scaled_mm_linear` promises against the cast
    path, what `bench/gpu_acceptance.py` reports as "within fp8 rounding", and what `_scaled_mm`'s
    fast accumulation must keep to be used (`mochi.fp8_accumulation`).

    Args:
        product: [M, N] the fp8 product (any float dtype).
        reference: [M, N] fp32, the product it is judged against.
        activations: [M, K] and weight: [N, K], the operands (any float dtype; fp32 here).
        output_dtype: the dtype the product was rounded to.
    """
    magnitude = activations.float().abs() @ weight.float().abs().T  # [M, N]
    rounding = torch.finfo(output_dtype).eps / 2
    bound = FP8_INPUT_ROUNDING * magnitude + rounding * reference.abs() + ROUNDING_FLOOR
    return bool(((product.float() - reference).abs() <= bound).all())


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale_weight: torch.Tensor,
                     bias: torch.Tensor | None, fast_accumulation: bool = False,
                     scaled_mm: Callable | None = None) -> torch.Tensor:
    """y = x @ (weight * scale_weight)^T + bias with x quantised per tensor to fp8.

    The activation scale is the power of two at or above absmax / 448, so scaling x is exact in
    its own dtype and the fp8 rounding is the only change to it (`quantise_activations`). The extra
    memory is the fp8 copy of x, a byte per element (the planner counts it). Zero rows (an empty
    negative prompt's text stream) give an empty result without computing a scale.

    Args:
        x: [..., K] bf16 or fp16 activations (any number of rows, zero included).
        weight: [N, K] float8_e4m3fn (row-major; its transpose is the column-major operand
            `_scaled_mm` wants).
        scale_weight: fp32 scalar.
        bias: [N] or None.
        fast_accumulation: `_scaled_mm`'s use_fast_accum (Hopper: faster, fewer accumulator bits
            between rescales); a pool turns it on only where it measured that it keeps
            `within_fp8_rounding` (`mochi.fp8_accumulation`).
        scaled_mm: the fp8 matmul, called as `torch._scaled_mm` is (None: `torch._scaled_mm`;
            tests pass a fake).

    Returns:
        [..., N] in x's dtype: the product of the dequantised fp8 operands accumulated in fp32 and
        rounded once to x's dtype. Against the unquantised x it carries fp8's input rounding
        (at most 2^-4 relative per element).
    """
    *lead, K = x.shape
    N = weight.shape[0]
    rows = x.reshape(-1, K)  # [M, K]
    if rows.shape[0] == 0:  # the inf-norm of an empty tensor raises; nothing to multiply
        return x.new_empty(*lead, N)
    quantised, scale_x = quantise_activations(rows)  # [M, K] fp8, fp32 scalar
    bias = None if bias is None else bias.to(x.dtype)
    scaled_mm = torch._scaled_mm if scaled_mm is None else scaled_mm
    out = scaled_mm(quantised, weight.t(), scale_a=scale_x, scale_b=scale_weight.float(),
                    bias=bias, out_dtype=x.dtype, use_fast_accum=fast_accumulation)  # [M, N]
    return out.reshape(*lead, N)


@dataclass(frozen=True)
class LowRankUpdate:
    """A low-rank addition to one Linear, applied at call time: y = base(x) + (x @ down^T) @ up^T.

    The base weights are never touched, so removing the update restores the base output bit for
    bit, and fp8 storage keeps working. Several LoRAs on one layer are stacked along R (their
    sum); strengths and alpha / rank are already folded into `up`. Built by `mochi.lora.apply_loras`.

    Args:
        down: [R, in] (the LoRA A matrices, stacked).
        up: [out, R] (the B matrices times strength x scale; zero where a LoRA covers only some
            rows, e.g. a diffusers to_q LoRA inside the fused qkv projection).
    """

    down: torch.Tensor
    up: torch.Tensor

    def __post_init__(self):
        if self.down.dim() != 2 or self.up.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"low-rank update needs down [R, in] and up [out, R], got "
                             f"{list(self.down.shape)} and {list(self.up.shape)}")


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a narrower dtype than the activations.

    The weight is cast to the input's dtype at call time. For ComfyUI `fp8_scaled` files kept in
    fp8 storage, `scale_weight` (a scalar) multiplies the cast weight: w = fp8_weight * scale; on
    GPUs with fp8 tensor cores such a weight multiplies in fp8 instead (`fp8_compute`), with
    `_scaled_mm`'s fast accumulation when `fast_accumulation` is True (a pool sets it on every fp8
    Linear once, from a measurement at load: `mochi.fp8_accumulation`; False otherwise).
    `low_rank` (None, or a LowRankUpdate set by `mochi.lora.apply_loras` / cleared by
    `clear_loras`) adds a LoRA at call time, in the input's dtype, on either path.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", None)
        self.low_rank: LowRankUpdate | None = None  # not a buffer: never part of the state dict
        self.fast_accumulation = False  # the pool's measured choice (fp8_accumulation); not in the state dict

    def base_weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored weight [out, in] in `dtype` (fp8 storage: cast, then times scale_weight), no LoRA."""
        weight = self.weight.to(dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(dtype)
        return weight

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight [out, in] in `dtype`: the stored weight plus the LoRA, if any (dense;
        for callers that need the matrix itself, such as the attention pool's folded projection)."""
        weight = self.base_weight_as(dtype)
        if self.low_rank is not None:
            weight = torch.addmm(weight, self.low_rank.up.to(dtype), self.low_rank.down.to(dtype))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_weight is not None and fp8_compute(
            x.device.type, _capability(x.device), self.weight.dtype, x.dtype, self.in_features, self.out_features
        ) is Fp8Compute.SCALED_MM:
            out = scaled_mm_linear(x, self.weight, self.scale_weight, self.bias, self.fast_accumulation)  # [..., out]
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = F.linear(x, self.base_weight_as(x.dtype), bias)  # [..., out]
        if self.low_rank is None:
            return out
        hidden = F.linear(x, self.low_rank.down.to(x.dtype))  # [..., R]
        # accumulate into the fresh output in place: no second [..., out] temporary
        out.view(-1, self.out_features).addmm_(hidden.reshape(-1, hidden.shape[-1]), self.low_rank.up.to(x.dtype).t())
        return out


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (Mochi's per-head q/k norms, eps 1e-5); fp32 inside."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel that accumulates in fp32 whatever x's dtype: no fp32 copy of x first
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
