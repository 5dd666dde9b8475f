"""Small building blocks shared by the DiT and the VAE: a Linear that stores weights in any
dtype (bf16, fp16, fp32, or fp8 with a per-tensor scale) and computes in the input's dtype,
and the fp32 RMS norms Mochi uses."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a narrower dtype than the activations.

    The weight is cast to the input's dtype at call time. For ComfyUI `fp8_scaled` files kept in
    fp8 storage, `scale_weight` (a scalar) multiplies the cast weight: w = fp8_weight * scale.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", None)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight [out, in] in `dtype` (fp8 storage: cast, then times scale_weight)."""
        weight = self.weight.to(dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(dtype)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_as(x.dtype), bias)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (Mochi's per-head q/k norms, eps 1e-5); fp32 inside."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel, fp32 inside (the input is upcast first)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
