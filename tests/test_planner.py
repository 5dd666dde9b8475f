"""The capacity planner: counted FLOPs vs the analytic formula, the memory tracker vs hand counts and
real tensors, the depth shortcut vs a full-depth run, sent bytes vs theory, and the recommendation."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import attention_with_lse
from mochi_xdit.mochi.planner import degree_mixes, get_gpu, gpu_from_device_name, link_bandwidth, plan, recommend
from mochi_xdit.mochi.planner.counting import Counter, fake_module
from mochi_xdit.mochi.planner.simulate import count_step, weight_bytes

TINY = DiTConfig(
    depth=3, num_heads=4, head_dim=32, hidden_size_x=128, hidden_size_y=64,
    mlp_hidden_x=256, mlp_hidden_y=128, t5_feat_dim=64,
)
TEXT = 8


def analytic_forward_flops(config: DiTConfig, video_tokens: int, text_tokens: int) -> float:
    """Linear layers 2 x params x tokens (per stream), attention 4 x S^2 x D x L (joint sequence
    S = video + text; the last block has no text queries). Embedders and modulation are left out:
    they see one token or the 12-channel latent and are far below the 5 % tolerance."""
    Dx, Dy, inner = config.hidden_size_x, config.hidden_size_y, config.inner_dim
    video_params = Dx * 3 * inner + inner * Dx + Dx * 2 * config.mlp_hidden_x + config.mlp_hidden_x * Dx
    text_params = Dy * 3 * inner + inner * Dy + Dy * 2 * config.mlp_hidden_y + config.mlp_hidden_y * Dy
    depth = config.depth
    linear = 2 * video_params * video_tokens * depth + 2 * text_params * text_tokens * (depth - 1)
    linear += 2 * Dy * 3 * inner * text_tokens  # the last block still projects text q, k, v
    S = video_tokens + text_tokens
    attention = 4 * S * S * inner * (depth - 1) + 4 * video_tokens * S * inner
    return linear + attention


def count_forward(config: DiTConfig, latent_shape, text_tokens: int, fake: bool = True):
    """Count one single-device forward; returns the Counter."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    if fake:
        model = fake_module(lambda: MochiDiT(config), fake_mode, torch.float32)
    else:
        torch.manual_seed(0)
        model = MochiDiT(config)
    counter = Counter(fake_mode, mask_true=text_tokens)
    mode = fake_mode if fake else torch.no_grad()
    with mode, torch.no_grad(), counter:
        latent = torch.randn(latent_shape)
        features = torch.randn(1, text_tokens, config.t5_feat_dim)
        mask = torch.ones(1, text_tokens, dtype=torch.int64)
        out = model(latent, torch.full((1,), 0.5), features, mask)
        del out, latent, features, mask
    return counter


@pytest.mark.parametrize("latent_shape", [(1, 12, 3, 16, 16), (1, 12, 5, 24, 32)])
def test_counted_flops_match_analytic_formula_at_two_sizes(latent_shape):
    _, _, T, H, W = latent_shape
    video_tokens = T * (H // 2) * (W // 2)
    counter = count_forward(TINY, latent_shape, TEXT)
    expected = analytic_forward_flops(TINY, video_tokens, TEXT)
    assert counter.counts.total_flops == pytest.approx(expected, rel=0.05)
    attention = 4 * (video_tokens + TEXT) ** 2 * TINY.inner_dim * (TINY.depth - 1)
    attention += 4 * video_tokens * (video_tokens + TEXT) * TINY.inner_dim
    pool = 4 * 1 * (1 + TEXT) * TINY.t5_feat_dim  # the T5 attention pool: one query over [mean, tokens]
    # Exact from the kernel calls' shapes; the tiny pool counts here if it runs through a fused kernel.
    assert counter.counts.flops["attention"] in (attention, attention + pool)


def test_full_scale_forward_flops_match_formula_848x480x163():
    # One forward (cfg = 1) of the real 10B config: DESIGN.md's floor is ~1,668 TFLOP, 71 % attention.
    step = count_step(ParallelConfig(1), 848, 480, 163, "bf16", use_cfg=False)
    config = DiTConfig()
    video_tokens = 28 * 30 * 53
    expected = analytic_forward_flops(config, video_tokens, 256)
    assert step.total_flops == pytest.approx(expected, rel=0.05)
    assert step.total_flops == pytest.approx(1668e12, rel=0.02)
    assert step.flops["attention"] / step.total_flops == pytest.approx(0.71, abs=0.01)


def test_attention_is_accounted_like_a_flash_kernel():
    # q, k, v [1, 2, 4096, 64] bf16: a math fallback would allocate 2 x 4096^2 x 4 bytes = 134 MB of scores.
    B, H, S, D = 1, 2, 4096, 64
    fake_mode = FakeTensorMode()
    counter = Counter(fake_mode)
    with fake_mode, counter:
        q, k, v = (torch.empty(B, H, S, D, dtype=torch.bfloat16) for _ in range(3))
        out, lse = attention_with_lse(q, k, v)
    inputs = 3 * B * H * S * D * 2
    assert counter.counts.peak_bytes == inputs + B * H * S * D * 2 + B * H * S * 4  # + out bf16 + lse fp32
    assert counter.counts.flops["attention"] == 4 * B * H * S * S * D


def test_tracker_matches_hand_count_for_a_linear_silu_chain():
    fake_mode = FakeTensorMode()
    linear = fake_module(lambda: torch.nn.Linear(256, 1024), fake_mode, torch.float32)
    counter = Counter(fake_mode)
    with fake_mode, torch.no_grad(), counter:
        x = torch.empty(100, 256)  # 102,400 B
        h = linear(x)  # 409,600 B
        g = torch.nn.functional.silu(h)  # 409,600 B, peak here
        del h
        out = g.sum()
    assert counter.counts.peak_bytes == 4 * (100 * 256 + 2 * 100 * 1024)
    assert counter.counts.end_bytes == 4 * (100 * 256 + 100 * 1024 + 1)  # x, g and the scalar
    assert counter.counts.flops["linear"] == 2 * 100 * 256 * 1024
    del x, g, out


def test_tracker_gives_the_same_peak_on_fake_and_real_cpu_tensors():
    # The same tiny forward run for real on CPU and on fake tensors: the fake run is what the planner
    # trusts at full scale, so it must account exactly like the real one.
    shape = (1, 12, 3, 16, 16)
    real = count_forward(TINY, shape, TEXT, fake=False)
    fake = count_forward(TINY, shape, TEXT, fake=True)
    assert real.counts.peak_bytes > 0
    assert fake.counts.peak_bytes == real.counts.peak_bytes
    assert fake.counts.flops == real.counts.flops


def test_depth_shortcut_matches_a_full_depth_run_with_ulysses_and_cfg():
    config = DiTConfig(
        depth=4, num_heads=4, head_dim=32, hidden_size_x=128, hidden_size_y=64,
        mlp_hidden_x=256, mlp_hidden_y=128,
    )
    parallel = ParallelConfig(2, 1, 2, 1, num_heads=4)
    short = count_step(parallel, 128, 96, 13, "bf16", config=config)
    full = count_step(parallel, 128, 96, 13, "bf16", config=config, full_depth=True)
    assert short.flops == full.flops
    assert short.sent_bytes == full.sent_bytes
    assert short.activation_peak_bytes == full.activation_peak_bytes


def test_sent_bytes_match_ulysses_and_cfg_theory():
    config = DiTConfig(
        depth=3, num_heads=4, head_dim=32, hidden_size_x=128, hidden_size_y=64,
        mlp_hidden_x=256, mlp_hidden_y=128,
    )
    U = 2
    step = count_step(ParallelConfig(4, 2, U, 1, num_heads=4), 128, 96, 13, "bf16", config=config)
    S = 3 * (96 // 16) * (128 // 16)  # 3 latent frames x 6 x 8 patches = 144 tokens
    S_local, inner, item, L = S // U, config.inner_dim, 2, 256
    per_block = (3 + 1) * S_local * inner * item * (U - 1) // U  # q, k, v in and the output back
    text_gather = (U - 1) * L * (inner // U) * item  # text output head slices (not the last block)
    final_gather = (U - 1) * S_local * 4 * 12 * item  # the sequence gather of the prediction
    cfg_gather = 12 * 3 * 12 * 16 * 4  # one fp32 latent prediction per step
    assert step.sent_bytes["all_to_all"] == config.depth * per_block
    assert step.sent_bytes["all_gather"] == (config.depth - 1) * text_gather + final_gather + cfg_gather


def test_full_scale_single_rank_memory_goals_and_fp8_weights():
    bf16 = count_step(ParallelConfig(1), 848, 480, 163, "bf16")
    fp8 = count_step(ParallelConfig(1), 848, 480, 163, "fp8")
    assert bf16.weight_bytes == pytest.approx(2 * 10.03e9, rel=0.01)  # 10.03 B parameters
    assert fp8.weight_bytes < 0.51 * bf16.weight_bytes
    assert bf16.peak_bytes <= 26e9
    assert fp8.peak_bytes <= 16e9
    assert fp8.activation_peak_bytes >= bf16.activation_peak_bytes  # + the fp8 copy of each Linear's input


def test_fp8_counts_the_scaled_mm_path_on_fp8_gpus_and_the_cast_path_before_them():
    """On Hopper the planner runs what the rank runs: an fp8 copy of each Linear's input (one byte
    per element) and `_scaled_mm` (its FLOPs counted like any matmul); on Ampere the weight cast."""
    from mochi_xdit.mochi.parallel.kernel import InstalledKernels

    hopper, ampere = (count_step(ParallelConfig(1), 848, 480, 49, "fp8", installed=InstalledKernels(cuda_capability=c))
                      for c in ((9, 0), (8, 0)))
    bf16 = count_step(ParallelConfig(1), 848, 480, 49, "bf16", installed=InstalledKernels(cuda_capability=(8, 0)))
    assert hopper.flops == ampere.flops == bf16.flops
    # mlp_x.w2's input [S, 8192] in fp8 outweighs its [3072, 8192] weight in bf16 at this size
    assert hopper.activation_peak_bytes > ampere.activation_peak_bytes


def test_ulysses_divides_activation_memory_about_one_over_n():
    # Goal: with Ulysses N, activation memory per rank falls about as 1/N (here within 20 %).
    one = count_step(ParallelConfig(1), 848, 480, 163, "bf16").activation_peak_bytes
    for n in (2, 8):
        per_rank = count_step(ParallelConfig(n, 1, n, 1), 848, 480, 163, "bf16").activation_peak_bytes
        assert per_rank * n <= 1.2 * one, f"Ulysses {n}: {per_rank / 1e9:.2f} GB per rank vs {one / 1e9:.2f} GB on one"


def test_degree_mixes_are_every_valid_split():
    labels = {(p.cfg_degree, p.ulysses_degree, p.ring_degree) for p in degree_mixes(8)}
    assert labels == {(2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8)}
    assert {(p.ulysses_degree, p.ring_degree) for p in degree_mixes(5)} == {(1, 5)}
    assert all(p.cfg_degree == 1 for p in degree_mixes(4, use_cfg=False))


def test_recommend_picks_a_fitting_mix_and_says_why_when_nothing_fits():
    config = recommend(2, 848, 480, 163, gpu="H100", weight_dtype="bf16", link="nvlink")
    assert isinstance(config, ParallelConfig) and config.world_size == 2
    tight = plan(1, 848, 480, 163, gpu="RTX4090", weight_dtype="bf16", link="pcie")
    assert not tight.best.fits and tight.reason.startswith("nothing fits")
    assert "fp8" in tight.reason
    roomy = plan(1, 848, 480, 163, gpu="RTX4090", weight_dtype="fp8", link="pcie")
    assert roomy.best.fits


def test_hardware_lookup_and_link_errors_name_the_fix():
    assert get_gpu("a100").name == "A100-80" and get_gpu("4090").name == "RTX4090"
    assert get_gpu("RTX4090").memory_gb == pytest.approx(25.76, abs=0.01)  # 24564 MiB, as torch reports it
    assert link_bandwidth("nvlink", get_gpu("H100")) == 450.0
    assert link_bandwidth(25, get_gpu("L40")) == 25.0
    with pytest.raises(ValueError, match="no NVLink; use link 'pcie'"):
        link_bandwidth("nvlink", get_gpu("L40"))
    with pytest.raises(ValueError, match="unknown GPU"):
        get_gpu("V100")
    assert math.isclose(weight_bytes(DiTConfig(), "fp8") / 1e9, 10.03, rel_tol=0.02)
    assert gpu_from_device_name("NVIDIA A100-SXM4-40GB").name == "A100-40"
    assert gpu_from_device_name("NVIDIA GeForce RTX 4090").name == "RTX4090"
    assert gpu_from_device_name("Tesla V100-SXM2-32GB", 34e9).memory_gb == pytest.approx(34.0)
    with pytest.raises(ValueError, match="pass memory_bytes"):
        gpu_from_device_name("Tesla V100-SXM2-32GB")
