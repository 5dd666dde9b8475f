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


@pytest.mark.parametrize("rows", [0, 1, 15, 17, 33])  # empty (an empty negative prompt), one, not multiples of 16
@pytest.mark.parametrize("fast_accumulation", [False, True])
def test_scaled_mm_takes_any_row_count_within_fp8_input_rounding(rows, fast_accumulation):
    linear = fp8_linear()
    x = (torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(rows)) * 3).to(BF16)
    y = scaled_mm_linear(x, linear.weight, linear.scale_weight, linear.bias, fast_accumulation).float()
    expected = cast_path(linear, x)
    assert y.shape == (1, rows, 128)
    bound = 2.0**-4 * (x.float().abs() @ linear.weight_as(torch.float32).abs().T) + BF16_ROUNDING * expected.abs()
    assert ((y - expected).abs() <= bound + 1e-6).all()


def test_activations_are_quantised_in_two_reads_and_one_fp8_write():
    """Only the absmax and one fused scale-and-cast touch the [M, K] activations (no |x|, scaled,
    clamped or chunked copies), and the result equals scale, multiply and cast done separately."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mochi_xdit.mochi.layers import quantise_activations

    rows = (torch.randn(50, 256, generator=torch.Generator().manual_seed(4)) * 3).to(BF16)
    touched = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if any(t.numel() == rows.numel() for t in tensors):
                touched.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        quantised, scale = quantise_activations(rows)
    assert touched == ["linalg_vector_norm.default", "mul.out"]
    absmax = rows.float().abs().max()
    assert scale.item() == 2.0 ** torch.ceil(torch.log2(absmax / 448)).item()
    assert torch.equal(quantised, (rows * (1 / scale).to(BF16)).to(FP8))
    assert quantised.float().abs().max() <= 448


def test_an_fp8_dit_on_the_scaled_mm_path_runs_an_empty_negative_prompt(monkeypatch):
    """The fp8 GPU path (forced here: CPU torch has `_scaled_mm` too) with a negative prompt of no
    valid token: zero text rows reach t5_yproj, qkv_y, proj_y and mlp_y."""
    from mochi_xdit.mochi import layers
    from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit
    from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
    from mochi_xdit.mochi.text import TextCondition

    multiplied = []
    real = layers.scaled_mm_linear
    monkeypatch.setattr(layers, "fp8_compute", lambda *args: Fp8Compute.SCALED_MM)
    monkeypatch.setattr(layers, "scaled_mm_linear", lambda x, *rest: multiplied.append(x.shape[-2]) or real(x, *rest))
    model = random_dit(DEMO_DIT_CONFIG, "fp8", "cpu", seed=0)
    positive = TextCondition(torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(5)),
                             torch.ones(1, 8, dtype=torch.int64))
    request = SampleRequest(positive, TextCondition.empty(8), latent_shape=(1, 12, 2, 4, 6), seed=0, steps=1, cfg=4.5)
    with torch.no_grad():
        loop = DenoiseLoop(model, request, compute_dtype=BF16, device="cpu")
        loop.begin()
        loop.step(0)
    assert 0 in multiplied and 8 in multiplied  # the empty negative stream went through _scaled_mm
    assert torch.isfinite(loop.latent).all()


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
