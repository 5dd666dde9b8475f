"""GGUF-quantised Linear weights kept quantised in memory and dequantised per layer at call time.

A GGUF tensor of type Q8_0, Q4_0, Q4_K, Q5_K or Q6_K is stored row by row as GGML blocks (a fixed
number of elements per block, scales first or last); rows never share a block, so a weight
[out, in] is a byte matrix [out, in / block_elements * block_bytes]. `GGUFLinear` keeps that byte
matrix as its `weight` parameter (uint8) and turns it into the dense weight only while it
multiplies, in torch (on the GPU when the bytes are there). Splitting rows across ranks (sharded
weights) splits whole blocks, so FSDP2 shards these bytes like any weight.

Block layouts follow ggml's `ggml-common.h` (the `gguf` package's numpy dequantiser is the tests'
oracle):
    Q8_0  32 elements, 34 bytes:  d (f16), q int8[32];                      w = d * q
    Q4_0  32 elements, 18 bytes:  d (f16), 16 bytes of nibbles (low: elements 0-15, high: 16-31);
                                  w = d * (nibble - 8)
    Q4_K  256 elements, 144 bytes: d, dmin (f16), 12 bytes of 6-bit scales and mins for 8 groups
                                  of 32, 128 bytes of nibbles;              w = d * sc * q - dmin * m
    Q5_K  256 elements, 176 bytes: as Q4_K plus 32 bytes holding each element's fifth bit
    Q6_K  256 elements, 210 bytes: 128 bytes low nibbles, 64 bytes 2-bit highs, int8 scales[16]
                                  (one per 16 elements), d (f16) last;       w = d * sc * (q - 32)
"""

from enum import Enum

import torch

from .layers import Linear


class GGUFQuant(str, Enum):
    """The GGUF block types a GGUFLinear multiplies from (values are ggml's type names)."""

    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"

    @property
    def block_elements(self) -> int:
        return 32 if self in (GGUFQuant.Q8_0, GGUFQuant.Q4_0) else 256

    @property
    def block_bytes(self) -> int:
        return {"Q8_0": 34, "Q4_0": 18, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[self.value]

    def row_bytes(self, columns: int) -> int:
        """Bytes of one row of `columns` elements; raises when the row is not whole blocks."""
        if columns % self.block_elements:
            raise ValueError(f"a {self.value} row holds whole blocks of {self.block_elements} elements; "
                             f"{columns} columns do not divide")
        return columns // self.block_elements * self.block_bytes


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte `start` of every block, as fp32 [N, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit (scale, min) pairs packed in 12 bytes. packed [N, 12] uint8 ->
    ([N, 8], [N, 8]) fp32."""
    q = packed.to(torch.int32)
    low_scales, low_mins = q[:, 0:4] & 63, q[:, 4:8] & 63
    high_scales = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    high_mins = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([low_scales, high_scales], 1).float(), torch.cat([low_mins, high_mins], 1).float()


def _nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) 4-bit halves of every byte, as int32."""
    q = packed.to(torch.int32)
    return q & 0xF, q >> 4


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()  # [N, 32]


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    low, high = _nibbles(blocks[:, 2:18])  # [N, 16] each
    return _f16(blocks, 0) * (torch.cat([low, high], 1) - 8).float()  # [N, 32]


def _dequantize_k4_or_k5(blocks: torch.Tensor, fifth_bits: torch.Tensor | None, qs_start: int) -> torch.Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [N, 1]
    scales, mins = _scale_min_k4(blocks[:, 4:16])  # [N, 8]
    low, high = _nibbles(blocks[:, qs_start : qs_start + 128].reshape(-1, 4, 32))  # [N, 4, 32]: 64-element chunks
    q = torch.stack([low, high], 2)  # [N, 4, 2, 32]: group 2j = low nibbles of chunk j, 2j+1 = high
    if fifth_bits is not None:  # [N, 32] bytes: bit g of byte l is element l of group g
        shifts = torch.arange(8, device=blocks.device, dtype=torch.int32).view(1, 4, 2, 1)
        q = q + ((fifth_bits.to(torch.int32)[:, None, None, :] >> shifts) & 1) * 16
    q = q.reshape(-1, 8, 32).float()  # [N, 8 groups, 32]
    return (d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]  # [N, 8, 32]


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _dequantize_k4_or_k5(blocks, None, 16).reshape(-1, 256)


def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    return _dequantize_k4_or_k5(blocks, blocks[:, 16:48], 48).reshape(-1, 256)


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    low = blocks[:, 0:128].to(torch.int32).reshape(-1, 2, 2, 32)  # [N, half, (l, l+32), 32]
    high = blocks[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)  # [N, half, 1, 32]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [N, 16]
    d = _f16(blocks, 208)  # [N, 1]
    # per half of 128: quarters q1..q4 = low nibble of ql[l], of ql[l+32], high nibble of ql[l], of ql[l+32],
    # each with 2 bits of qh[l] at shifts 0, 2, 4, 6
    nibbles = torch.stack([low & 0xF, low >> 4], 2)  # [N, half, nibble, (l, l+32), 32]
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.int32).view(1, 1, 2, 2, 1)
    q = (nibbles | (((high[:, :, None] >> shifts) & 3) << 4)) - 32  # [N, half, nibble, part, 32]
    q = q.reshape(-1, 2, 4, 2, 16).float()  # [N, half, quarter, 16-group, 16]
    s = scales.reshape(-1, 2, 4, 2)  # [N, half, quarter, 16-group]: sc[8 * half + 2 * quarter + group]
    return (d[:, :, None, None, None] * s[..., None] * q).reshape(-1, 256)


_DEQUANTIZE = {
    GGUFQuant.Q8_0: _dequantize_q8_0,
    GGUFQuant.Q4_0: _dequantize_q4_0,
    GGUFQuant.Q4_K: _dequantize_q4_k,
    GGUFQuant.Q5_K: _dequantize_q5_k,
    GGUFQuant.Q6_K: _dequantize_q6_k,
}


def dequantize(data: torch.Tensor, quant: GGUFQuant, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGML blocks to dense values.

    Args:
        data: [..., row_bytes] uint8, whole blocks per row.
        quant: the block type.
        dtype: the result's dtype (the arithmetic is fp32).

    Returns:
        [..., row_bytes / block_bytes * block_elements] in `dtype`.
    """
    *lead, row_bytes = data.shape
    if row_bytes % quant.block_bytes:
        raise ValueError(f"{quant.value} rows are whole {quant.block_bytes}-byte blocks; got rows of {row_bytes} bytes")
    blocks = data.reshape(-1, quant.block_bytes)  # [N, block_bytes]
    values = _DEQUANTIZE[quant](blocks)  # [N, block_elements] fp32
    return values.reshape(*lead, row_bytes // quant.block_bytes * quant.block_elements).to(dtype)


class GGUFLinear(Linear):
    """A Linear whose `weight` is GGUF block bytes [out, row_bytes] (uint8), dequantised at call time.

    Everything else is `Linear`'s: the bias, a LoRA added at call time (`low_rank`), `weight_as`.
    Built by `quantised_linear` from a Linear of the same size.

    Args:
        in_features, out_features, bias: as nn.Linear.
        quant: the GGUFQuant of the weight bytes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: GGUFQuant, device=None):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.quant = GGUFQuant(quant)
        row_bytes = self.quant.row_bytes(in_features)
        self.weight = torch.nn.Parameter(torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)

    def base_weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised weight [out, in] in `dtype` (a fresh tensor per call), no LoRA."""
        return dequantize(self.weight, self.quant, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant={self.quant.value}"


def quantised_linear(linear: Linear, quant: GGUFQuant, data: torch.Tensor, bias: torch.Tensor | None) -> GGUFLinear:
    """A GGUFLinear with `linear`'s sizes holding `data` [out, row_bytes] uint8 and `bias` [out] (or None)."""
    layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, quant, device="meta")
    expected = (linear.out_features, layer.quant.row_bytes(linear.in_features))
    if tuple(data.shape) != expected or data.dtype != torch.uint8:
        raise ValueError(f"{quant.value} weight bytes of shape {list(data.shape)} ({data.dtype}) do not fit a "
                         f"{linear.out_features}x{linear.in_features} Linear (need {list(expected)} uint8)")
    layer.weight = torch.nn.Parameter(data, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.requires_grad_(False)
