"""fp8 weights: the pure dispatch (`fp8_compute`) for every branch, and the fp8 x fp8 product
(`scaled_mm_linear`, torch._scaled_mm, which this torch also runs on CPU) against the cast path.

Oracles: with activations that fp8 holds exactly (fp8 values times a power of two) the fp8
product must equal the cast path's to bf16 output rounding; with any activations it differs by at
most fp8's input rounding, 2^-4 relative per element: |y - y_cast| <= 2^-4 * (|x| @ |W|^T).
"""

import pytest
import torch

from mochi_xdit.mochi.layers import FP8, Fp8Compute, Linear, fp8_compute, quantise_fp8, scaled_mm_linear

BF16 = torch.bfloat16
BF16_ROUNDING = 2.0**-8  # relative, one rounding of the output


@pytest.mark.parametrize("device, capability, weight, activations, sizes, expected", [
    ("cuda", (9, 0), FP8, BF16, (3072, 9216), Fp8Compute.SCALED_MM),  # Hopper
    ("cuda", (8, 9), FP8, torch.float16, (64, 48), Fp8Compute.SCALED_MM),  # Ada
    ("cuda", (10, 0), FP8, BF16, (64, 48), Fp8Compute.SCALED_MM),  # Blackwell
    ("cuda", (8, 6), FP8, BF16, (64, 48), Fp8Compute.CAST),  # Ampere: no fp8 tensor cores
    ("cuda", (8, 0), FP8, BF16, (64, 48), Fp8Compute.CAST),
    ("cuda", None, FP8, BF16, (64, 48), Fp8Compute.CAST),
    ("cpu", None, FP8, BF16, (64, 48), Fp8Compute.CAST),
    ("cuda", (9, 0), BF16, BF16, (64, 48), Fp8Compute.CAST),  # not an fp8 weight
    ("cuda", (9, 0), torch.float8_e5m2, BF16, (64, 48), Fp8Compute.CAST),
    ("cuda", (9, 0), FP8, torch.float32, (64, 48), Fp8Compute.CAST),  # fp32 activations keep their precision
    ("cuda", (9, 0), FP8, BF16, (24, 48), Fp8Compute.CAST),  # K not a multiple of 16
    ("cuda", (9, 0), FP8, BF16, (64, 40), Fp8Compute.CAST),  # N not a multiple of 16
])
def test_fp8_compute_dispatch(device, capability, weight, activations, sizes, expected):
    assert fp8_compute(device, capability, weight, activations, *sizes) is expected


def fp8_linear(in_features=256, out_features=128, seed=0) -> Linear:
    torch.manual_seed(seed)
    linear = Linear(in_features, out_features).to(BF16)
    weight, scale = quantise_fp8(linear.weight.float())
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    linear.scale_weight = scale
    return linear.requires_grad_(False)


def cast_path(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    """The cast path's product in fp32 (the dequantised weight, fp32 activations)."""
    return torch.nn.functional.linear(x.float(), linear.weight_as(torch.float32), linear.bias.float())


def test_scaled_mm_equals_the_cast_path_when_fp8_holds_the_activations():
    linear = fp8_linear()
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 40, 256, generator=generator) * 8).to(FP8).float().mul(0.25).to(BF16)  # exact in fp8 x 2^-2
    y = scaled_mm_linear(x, linear.weight, linear.scale_weight, linear.bias)
    expected = cast_path(linear, x)
    assert y.shape == (2, 40, 128) and y.dtype == BF16
    assert ((y.float() - expected).abs() <= BF16_ROUNDING * expected.abs() + 1e-6).all()


def test_scaled_mm_differs_from_the_cast_path_by_at_most_fp8_input_rounding():
    linear = fp8_linear()
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 50, 256, generator=generator) * 3).to(BF16)
    y = scaled_mm_linear(x, linear.weight, linear.scale_weight, linear.bias).float()
    expected = cast_path(linear, x)
    bound = 2.0**-4 * (x.float().abs() @ linear.weight_as(torch.float32).abs().T) + BF16_ROUNDING * expected.abs()
    assert ((y - expected).abs() <= bound + 1e-6).all()
    assert (y - expected).abs().max() > 0  # the activations really went through fp8


def test_scaling_rows_chunk_by_chunk_changes_nothing(monkeypatch):
    from mochi_xdit.mochi import layers

    linear = fp8_linear()
    x = (torch.randn(3, 50, 256, generator=torch.Generator().manual_seed(3)) * 3).to(BF16)
    whole = scaled_mm_linear(x, linear.weight, linear.scale_weight, linear.bias)
    monkeypatch.setattr(layers, "FP8_QUANTISE_CHUNK", 7 * 256)  # 7 rows a chunk: 22 chunks, the last short
    assert torch.equal(scaled_mm_linear(x, linear.weight, linear.scale_weight, linear.bias), whole)


def test_linear_on_cpu_keeps_the_cast_path():
    linear = fp8_linear()
    x = torch.randn(4, 256).to(BF16)
    expected = torch.nn.functional.linear(x, linear.weight_as(BF16), linear.bias)
    assert torch.equal(linear(x), expected)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+)")
def test_linear_on_an_fp8_gpu_runs_scaled_mm_within_fp8_input_rounding():
    linear = fp8_linear(3072, 1536).cuda()
    x = torch.randn(4096, 3072, device="cuda").to(BF16)
    assert fp8_compute("cuda", torch.cuda.get_device_capability(), linear.weight.dtype, BF16, 3072, 1536) \
        is Fp8Compute.SCALED_MM
    y = linear(x).float()
    expected = cast_path(linear, x)
    bound = 2.0**-4 * (x.float().abs() @ linear.weight_as(torch.float32).abs().T) + BF16_ROUNDING * expected.abs()
    assert ((y - expected).abs() <= bound + 1e-5).all()
