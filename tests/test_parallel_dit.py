"""The whole DiT forward and a 3-step sampling run on real gloo ranks equal one device (fp32, 1e-5),
for every required degree mix at world sizes 2, 3 and 4.

One process-group launch per world size runs all of its layouts and cases (spawning is the slow
part on a 2-core CI machine). Forward cases: video tokens divisible and not divisible by the
sequence degree, text lengths 0, short and 256. The forward model uses a 64-wide T5 input so a
256-token prompt stays cheap (the attention path does not depend on that width); the sampling run
uses the demo model with real 4096-wide T5 features through the sampler's SampleRequest.

Sharded fp32 matmuls round differently from full ones (about 1e-6 on this model's outputs of
magnitude ~4); guidance multiplies the cond - uncond difference by the cfg scale, so the sampling
run uses cfg 2 (errors ~3e-6) rather than 4.5 (~1e-5 on these ~10-magnitude random latents).
"""

import dataclasses
import functools

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.dit import MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.testing import run_ranks
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
from mochi_xdit.mochi.text import TextCondition

pytestmark = pytest.mark.timeout(300)

TOLERANCE = 1e-5
# (cfg, ulysses, ring) per world size.
LAYOUTS = {
    2: {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2), "cfg2": (2, 1, 1)},
    4: {"ulysses4": (1, 4, 1), "ring4": (1, 1, 4), "ulysses2_ring2": (1, 2, 2), "cfg2_ulysses2": (2, 2, 1), "cfg2_ring2": (2, 1, 2)},
    3: {"ring3": (1, 1, 3), "ulysses3": (1, 3, 1)},
}
# latent [1, 12, T, H, W] -> T * H/2 * W/2 video tokens: 48 is divisible by 2, 3 and 4; 35 by none.
LATENTS = {"s48": (1, 12, 2, 12, 8), "s35": (1, 12, 1, 10, 14)}
TEXT_LENGTHS = (0, 7, 256)
FORWARD_CASES = [(latent, L) for latent in LATENTS for L in TEXT_LENGTHS]
SAMPLE_STEPS = 3
SAMPLE_CFG = 2.0


def model_config(world: int, t5_feat_dim: int):
    """The demo model (4 heads); 6 heads at world 3 so that ulysses 3 divides them."""
    heads = dict(num_heads=6, head_dim=32) if world == 3 else {}
    return dataclasses.replace(DEMO_DIT_CONFIG, t5_feat_dim=t5_feat_dim, **heads)


def build_model(config) -> MochiDiT:
    with torch.device("meta"):  # skip a second random init of the 50M-parameter T5 pool
        model = MochiDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=0), assign=True)
    return model.eval()


def forward_inputs(latent_name: str, L: int, t5_feat_dim: int):
    generator = torch.Generator().manual_seed(L + LATENTS[latent_name][-1])
    latent = torch.randn(LATENTS[latent_name], generator=generator)
    features = torch.randn(1, 256, t5_feat_dim, generator=generator)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, :L] = 1
    return latent, torch.tensor([0.7]), features, mask


def sample_request() -> SampleRequest:
    generator = torch.Generator().manual_seed(5)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, :7] = 1
    positive = TextCondition(torch.randn(1, 256, 4096, generator=generator), mask)
    return SampleRequest(
        positive=positive, negative=TextCondition.empty(), latent_shape=LATENTS["s35"], seed=3,
        steps=SAMPLE_STEPS, cfg=SAMPLE_CFG,
    )


def run_sampling(model, ctx) -> torch.Tensor:
    loop = DenoiseLoop(model, sample_request(), ctx=ctx)
    loop.begin()
    for i in range(loop.num_steps):
        loop.step(i)
    return loop.finish()


@torch.no_grad()
def rank_main(world: int) -> dict:
    """Runs on every rank: every layout of this world, every case, in one process group."""
    forward_model = build_model(model_config(world, t5_feat_dim=64))
    sampling_model = build_model(model_config(world, t5_feat_dim=4096))
    results = {}
    for name, (cfg, ulysses, ring) in LAYOUTS[world].items():
        config = ParallelConfig(world, cfg, ulysses, ring, num_heads=forward_model.config.num_heads)
        ctx = ParallelContext(config)
        for latent_name, L in FORWARD_CASES:
            results[(name, latent_name, L)] = forward_model(*forward_inputs(latent_name, L, 64), ctx=ctx)
        results[(name, "sampling")] = run_sampling(sampling_model, ctx)
        ctx.close()
    return results


@functools.lru_cache(maxsize=None)
def launch(world: int) -> list[dict]:
    return run_ranks(rank_main, world, world, timeout_s=280, collective_timeout_s=60)


@functools.lru_cache(maxsize=None)
def forward_reference(world: int, latent_name: str, L: int) -> torch.Tensor:
    with torch.no_grad():
        return build_model(model_config(world, 64))(*forward_inputs(latent_name, L, 64))


@functools.lru_cache(maxsize=None)
def sampling_reference(world: int) -> torch.Tensor:
    return run_sampling(build_model(model_config(world, 4096)), ctx=None)


LAYOUT_PARAMS = [(world, name) for world in LAYOUTS for name in LAYOUTS[world]]
IDS = [f"world{world}-{name}" for world, name in LAYOUT_PARAMS]


@pytest.mark.parametrize("world, layout", LAYOUT_PARAMS, ids=IDS)
def test_dit_forward_matches_single_rank(world, layout):
    results = launch(world)
    for latent_name, L in FORWARD_CASES:
        expected = forward_reference(world, latent_name, L)
        for rank, per_rank in enumerate(results):
            got = per_rank[(layout, latent_name, L)]
            assert got.shape == expected.shape
            error = (got - expected).abs().max().item()
            assert error <= TOLERANCE, f"{layout} {latent_name} text {L} rank {rank}: max abs error {error:.2e}"


@pytest.mark.parametrize("world, layout", LAYOUT_PARAMS, ids=IDS)
def test_three_step_sampling_matches_single_rank(world, layout):
    results = launch(world)
    expected = sampling_reference(world)
    for rank, per_rank in enumerate(results):
        got = per_rank[(layout, "sampling")]
        error = (got - expected).abs().max().item()
        assert error <= TOLERANCE, f"{layout} sampling rank {rank}: max abs error {error:.2e}"
