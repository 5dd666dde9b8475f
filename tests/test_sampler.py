"""The stepwise sampler against a hand-written Euler/CFG loop, its call pattern, and its checks."""

import threading

import pytest
import torch

from mochi_xdit.mochi.constants import LATENT_MEAN, LATENT_STD
from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.parallel.kernel import AttentionBackend
from mochi_xdit.mochi.pipeline import generate
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest, latent_shape_for_video
from mochi_xdit.mochi.text import TextCondition

TINY = DiTConfig(depth=2, num_heads=2, head_dim=16, hidden_size_x=32, hidden_size_y=16,
                 mlp_hidden_x=64, mlp_hidden_y=32, t5_feat_dim=32)


@pytest.fixture(scope="module")
def model():
    dit = MochiDiT(TINY)
    dit.load_state_dict(random_dit_state_dict(TINY, seed=5))
    return dit.eval().requires_grad_(False)


def text(valid: int, seed: int, length: int = 12) -> TextCondition:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[0, :valid] = 1
    return TextCondition(torch.randn(1, length, TINY.t5_feat_dim, generator=generator), mask)


class CountingModel(torch.nn.Module):
    """Wraps a DiT and counts forward calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_three_steps_match_hand_computed_euler_cfg(model):
    positive, negative = text(5, 1), text(0, 2)  # empty negative: zero valid tokens
    cfgs = [4.5, 2.0, 1.0]
    request = SampleRequest(positive, negative, latent_shape=(2, 12, 2, 4, 6), seed=7, steps=3,
                            cfg=cfgs, schedule="linear_quadratic")
    got = generate(model, request)

    # genmo's linear-quadratic schedule for n = 3 (L = 1, tau = 0.025), written out:
    # x = [0, a+b+c, 4a+2b+c, 1] with a = c = 0.925 / 4, b = 0.025 - 2 * 0.925 / 4
    a = (1 - 0.025 * 3) / 4
    b = 0.025 - 2 * (1 - 0.025 * 3) / 4
    sigmas = [1.0, 1 - (a + b + a), 1 - (4 * a + 2 * b + a), 0.0]
    noise = torch.randn((2, 12, 2, 4, 6), generator=torch.manual_seed(7), dtype=torch.float32)
    z = noise.clone()
    with torch.no_grad():
        for i in range(3):
            for sample in range(2):
                x = z[sample : sample + 1]
                sigma = torch.tensor([sigmas[i]])
                cond = model(x, sigma, positive.features, positive.mask)
                if cfgs[i] == 1.0:
                    pred = cond
                else:
                    uncond = model(x, sigma, negative.features, negative.mask)
                    pred = uncond + cfgs[i] * (cond - uncond)
                z[sample : sample + 1] = x + (sigmas[i] - sigmas[i + 1]) * pred
    mean = torch.tensor(LATENT_MEAN).view(1, 12, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, 12, 1, 1, 1)
    expected = z * std + mean  # back to VAE space

    assert got.shape == (2, 12, 2, 4, 6) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6
    assert (got - (noise * std + mean)).abs().max().item() > 1e-2, "the model must have changed the latent"


@pytest.mark.parametrize("cfg,calls_per_step", [(1.0, 1), (4.5, 2)])
def test_cfg_one_skips_unconditional_pass(model, cfg, calls_per_step):
    counting = CountingModel(model)
    request = SampleRequest(text(3, 1), text(2, 2), latent_shape=(2, 12, 1, 2, 2), steps=3, cfg=cfg,
                            schedule="simple")
    generate(counting, request)
    assert counting.calls == 3 * 2 * calls_per_step  # steps x batch x branches


def test_per_step_cfg_list_skips_only_cfg_one_steps(model):
    counting = CountingModel(model)
    request = SampleRequest(text(3, 1), text(2, 2), latent_shape=(1, 12, 1, 2, 2), steps=3, cfg=[1.0, 3.0, 1.0])
    generate(counting, request)
    assert counting.calls == 4


def test_empty_init_latent_equals_fresh_noise_and_nonzero_is_normalised(model):
    positive, negative = text(4, 3), text(0, 4)
    shape = (1, 12, 2, 4, 4)
    fresh = generate(model, SampleRequest(positive, negative, latent_shape=shape, seed=3, steps=2))
    empty = generate(model, SampleRequest(positive, negative, init_latent=torch.zeros(shape), seed=3, steps=2))
    assert torch.equal(fresh, empty)

    init = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    request = SampleRequest(positive, negative, init_latent=init, seed=3, steps=4, denoise=0.5, schedule="simple")
    loop = DenoiseLoop(model, request)
    loop.begin()
    sigma = request.sigmas[0]
    assert sigma < 1.0
    mean = torch.tensor(LATENT_MEAN).view(1, 12, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, 12, 1, 1, 1)
    noise = torch.randn(shape, generator=torch.manual_seed(3))
    expected = sigma * noise + (1 - sigma) * ((init - mean) / std)  # ComfyUI CONST.noise_scaling
    assert (loop.latent - expected).abs().max().item() <= 1e-6


def test_loop_verbs_out_of_order_raise(model):
    loop = DenoiseLoop(model, SampleRequest(text(1, 1), text(1, 2), latent_shape=(1, 12, 1, 2, 2), steps=2))
    with pytest.raises(RuntimeError, match="before begin"):
        loop.step(0)
    loop.begin()
    with pytest.raises(RuntimeError, match="out of order"):
        loop.step(1)
    loop.step(0)
    with pytest.raises(RuntimeError, match="1 of 2 steps"):
        loop.finish()


class ThreadCfgContext:
    """Stands in for a ParallelContext with cfg_degree 2: two threads exchange predictions."""

    cfg_degree = 2
    attention_backend = AttentionBackend.AUTO

    def __init__(self, rank, shared, barrier):
        self.cfg_rank, self.shared, self.barrier = rank, shared, barrier

    def gather_cfg(self, pred):
        self.shared[self.cfg_rank] = pred.clone()
        self.barrier.wait()
        cond, uncond = self.shared[0], self.shared[1]
        self.barrier.wait()
        return cond, uncond


class BranchModel(torch.nn.Module):
    """A cheap stand-in DiT (the parallel DiT itself is tested with real process groups elsewhere)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.texts = []

    def forward(self, latent, sigma, features, mask, ctx=None, attention=None):
        self.texts.append(int(mask.sum()))
        return self.scale * latent + sigma.view(1, 1, 1, 1, 1) + features[:, mask[0].bool()].sum() * 0.01


def run_two_cfg_ranks(request):
    """Both CFG ranks of a cfg_degree 2 layout, as two threads; returns ({rank: latent}, {rank: model})."""
    shared, barrier, results, models = {}, threading.Barrier(2), {}, {0: BranchModel(), 1: BranchModel()}

    def rank(r):
        results[r] = generate(models[r], request, ctx=ThreadCfgContext(r, shared, barrier))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, models


def test_cfg_parallel_ranks_run_one_branch_each_and_match_single_device():
    positive, negative = text(5, 1), text(2, 2)
    request = SampleRequest(positive, negative, latent_shape=(2, 12, 1, 2, 2), steps=3, cfg=[4.5, 1.0, 3.0])
    single = generate(BranchModel(), request)
    results, models = run_two_cfg_ranks(request)
    assert models[0].texts == [5] * 6  # the conditional branch, every step and sample
    # one branch per rank; at the cfg-1 step (no negative pass) rank 1 evaluates nothing
    assert models[1].texts == [2, 2, 2, 2]
    for r in (0, 1):
        assert (results[r] - single).abs().max().item() <= 1e-6


def test_cfg_parallel_with_cfg_one_runs_and_matches_single_device():
    request = SampleRequest(text(1, 1), text(1, 2), latent_shape=(1, 12, 1, 2, 2), steps=2, cfg=1.0)
    single = generate(BranchModel(), request)
    results, models = run_two_cfg_ranks(request)
    assert models[0].texts == [1, 1] and models[1].texts == []  # no unconditional pass to run
    for r in (0, 1):
        assert (results[r] - single).abs().max().item() == 0.0


def test_request_validation_names_the_fix(model):
    positive, negative = text(1, 1), text(1, 2)
    assert latent_shape_for_video(848, 480, 49) == (1, 12, 9, 60, 106)
    with pytest.raises(ValueError, match="6k\\+1 frames; use 49 or 55"):
        latent_shape_for_video(848, 480, 50)
    with pytest.raises(ValueError, match="width=850 must be a multiple of 16; use 848 or 864"):
        latent_shape_for_video(850, 480, 49)
    with pytest.raises(ValueError, match="must be even"):
        SampleRequest(positive, negative, latent_shape=(1, 12, 3, 5, 4))
    with pytest.raises(ValueError, match="12"):
        SampleRequest(positive, negative, latent_shape=(1, 16, 3, 4, 4))
    with pytest.raises(ValueError, match="exactly one of latent_shape"):
        SampleRequest(positive, negative, latent_shape=(1, 12, 1, 2, 2), init_latent=torch.zeros(1, 12, 1, 2, 2))
    with pytest.raises(ValueError, match="one per step"):
        SampleRequest(positive, negative, latent_shape=(1, 12, 1, 2, 2), steps=3, cfg=[4.5, 4.5])
    with pytest.raises(ValueError, match="denoise"):
        SampleRequest(positive, negative, latent_shape=(1, 12, 1, 2, 2), denoise=1.5)
    with pytest.raises(ValueError, match="schedule"):
        SampleRequest(positive, negative, latent_shape=(1, 12, 1, 2, 2), schedule="karras")
    with pytest.raises(ValueError, match="text mask shape"):
        TextCondition(torch.zeros(1, 4, 32), torch.ones(1, 5, dtype=torch.int64))
    wide = TextCondition(torch.zeros(1, 4, 4096), torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="4096 wide but this DiT takes 32"):
        DenoiseLoop(model, SampleRequest(wide, negative, latent_shape=(1, 12, 1, 2, 2)))


def test_generate_then_decode_frames_gives_comfy_images(model):
    from mochi_xdit.mochi.demo import DEMO_VAE_CONFIG, random_vae_state_dict
    from mochi_xdit.mochi.pipeline import decode_frames
    from mochi_xdit.mochi.vae import MochiVAEDecoder

    vae = MochiVAEDecoder(DEMO_VAE_CONFIG)
    vae.load_state_dict(random_vae_state_dict(DEMO_VAE_CONFIG, seed=1))
    progress = []
    request = SampleRequest(text(3, 1), text(0, 2), latent_shape=(2, 12, 2, 2, 4), steps=2, schedule="simple")
    latent = generate(model, request, callback=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]
    frames = decode_frames(vae.eval(), latent)
    assert frames.shape == (2 * 7, 16, 32, 3) and frames.dtype == torch.float32  # 6T - 5 = 7 per video
    assert frames.min().item() >= 0.0 and frames.max().item() <= 1.0
    video = vae.decode(latent)  # [2, 3, 7, 16, 32], nominally in [-1, 1]
    expected = ((video.permute(0, 2, 3, 4, 1).reshape(14, 16, 32, 3) + 1) / 2).clamp(0, 1)
    assert (frames - expected).abs().max().item() <= 1e-6
