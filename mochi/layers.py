"""Small building blocks shared by the DiT and the VAE: a Linear that stores weights in any
dtype (bf16, fp16, fp32, or fp8 with a per-tensor scale) and computes in the input's dtype,
optionally plus a low-rank (LoRA) addition at call time, and the fp32 RMS norms Mochi uses."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    fp8 storage, `scale_weight` (a scalar) multiplies the cast weight: w = fp8_weight * scale.
    `low_rank` (None, or a LowRankUpdate set by `mochi.lora.apply_loras` / cleared by
    `clear_loras`) adds a LoRA at call time, in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", None)
        self.low_rank: LowRankUpdate | None = None  # not a buffer: never part of the state dict

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
        # one fused kernel, fp32 inside (the input is upcast first)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
