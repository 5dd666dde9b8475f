"""Step caching (TeaCache, first-block cache): exact when it never skips, really reuses the cached
residual when it does, and decides the same steps on every rank of every degree mix.

The test model is tiny with random weights, except that its time embedding is damped (x0.05):
random timestep MLPs swing the modulation between neighbouring steps far more than a trained one,
so no step would ever be similar enough to skip. The cfg schedule has cfg 1 at steps 0, 1 and 6:
the unconditional branch joins late (step 2 must compute: it has no cached residual yet) and drops
out once (the CFG rank that runs it sits that step out but still joins the decision).
"""

import functools

import numpy as np
import pytest
import torch

from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.testing import run_ranks
from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
from mochi_xdit.mochi.step_cache import (
    TEACACHE_MOCHI_COEFFICIENTS,
    TEACACHE_RISING_LIMIT,
    CacheStats,
    StepCacheKind,
    StepCacheSpec,
    teacache_rescale,
)
from mochi_xdit.mochi.text import TextCondition

pytestmark = pytest.mark.timeout(240)

TINY = DiTConfig(depth=2, num_heads=4, head_dim=16, hidden_size_x=64, hidden_size_y=32,
                 mlp_hidden_x=128, mlp_hidden_y=64, t5_feat_dim=64)
LATENT = (1, 12, 1, 10, 14)  # 35 video tokens: padded under every sequence degree
STEPS = 12
CFG = tuple(1.0 if i in (0, 1, 6) else 3.0 for i in range(STEPS))
# Thresholds that skip on this model, far from the decision boundary (the nearest accumulated
# TeaCache value is 0.098 and 0.141; first-block changes are <= 0.125 and >= 0.436).
SKIPPING = {StepCacheKind.TEACACHE: 0.12, StepCacheKind.FIRST_BLOCK: 0.3}
TOLERANCE = 1e-5
# (cfg, ulysses, ring) per world size: one launch per world size runs all of them.
LAYOUTS = {
    2: {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2), "cfg2": (2, 1, 1)},
    4: {"cfg2_ulysses2": (2, 2, 1), "ulysses2_ring2": (1, 2, 2)},
}


def build_model(config: DiTConfig = TINY) -> MochiDiT:
    state = random_dit_state_dict(config, seed=1)
    for name in ("t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias"):
        state[name] = state[name] * 0.05
    model = MochiDiT(config)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def text(valid: int, seed: int) -> TextCondition:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 16, dtype=torch.int64)
    mask[0, :valid] = 1
    return TextCondition(torch.randn(1, 16, TINY.t5_feat_dim, generator=generator), mask)


def request(cache: StepCacheSpec | None, cfg=CFG, latent_shape=LATENT) -> SampleRequest:
    return SampleRequest(text(7, 5), text(3, 6), latent_shape=latent_shape, seed=3, steps=len(cfg), cfg=cfg,
                         cache=cache)


def run(model, req: SampleRequest, ctx=None) -> tuple[torch.Tensor, CacheStats, list[torch.Tensor]]:
    """(VAE-space result, cache stats, model-space latent before each step and after the last)."""
    loop = DenoiseLoop(model, req, ctx=ctx)
    loop.begin()
    latents = [loop.latent.clone()]
    for i in range(loop.num_steps):
        loop.step(i)
        latents.append(loop.latent.clone())
    return loop.finish(), loop.cache_stats, latents


@pytest.fixture(scope="module")
def model():
    return build_model()


# --- options -------------------------------------------------------------------------------------

def test_spec_validation_names_the_fix():
    assert StepCacheSpec(StepCacheKind.TEACACHE, 0).threshold == 0.0
    assert StepCacheSpec.default(StepCacheKind.TEACACHE) == StepCacheSpec(StepCacheKind.TEACACHE, 0.06)
    assert StepCacheSpec.default(StepCacheKind.FIRST_BLOCK).threshold == 0.06
    assert StepCacheKind("first_block") is StepCacheKind.FIRST_BLOCK  # how a front door converts a choice
    with pytest.raises(TypeError, match="StepCacheKind\\(choice\\)"):
        StepCacheSpec("teacache", 0.06)
    with pytest.raises(ValueError, match="0 never skips"):
        StepCacheSpec(StepCacheKind.TEACACHE, -0.1)
    with pytest.raises(ValueError, match="must be in \\[0, 1.0\\]"):
        StepCacheSpec(StepCacheKind.FIRST_BLOCK, float("nan"))
    with pytest.raises(TypeError, match="must be a number"):
        StepCacheSpec(StepCacheKind.TEACACHE, True)
    with pytest.raises(TypeError, match="cache must be a StepCacheSpec"):
        request(cache="teacache")
    assert str(CacheStats((0, 2, 3), (1,))) == "computed 3 of 4 steps, skipped 1 (1)"


def test_teacache_rescale_is_the_published_polynomial_on_its_rising_range():
    # Oracle: numpy's polynomial of the published coefficients and the first root of its derivative.
    polynomial = np.poly1d(TEACACHE_MOCHI_COEFFICIENTS)
    first_peak = min(root.real for root in polynomial.deriv().roots if abs(root.imag) < 1e-12 and root.real > 0)
    assert TEACACHE_RISING_LIMIT == pytest.approx(first_peak, abs=1e-5)
    for relative in np.linspace(0.0, TEACACHE_RISING_LIMIT, 23):
        assert teacache_rescale(float(relative)) == pytest.approx(polynomial(relative), rel=1e-12, abs=1e-15)
    assert teacache_rescale(0.15) == float("inf")  # the polynomial is already falling (and < 0 past 0.145)
    assert teacache_rescale(float("nan")) == float("inf")


# --- one rank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(StepCacheKind), ids=lambda kind: kind.value)
def test_threshold_zero_equals_the_uncached_run_exactly(model, kind):
    expected, expected_stats, _ = run(model, request(None))
    got, stats, _ = run(model, request(StepCacheSpec(kind, 0.0)))
    assert torch.equal(got, expected)
    assert stats == expected_stats == CacheStats(tuple(range(STEPS)), ())


class BlockCalls:
    """Counts calls of every DiT block (forward hooks)."""

    def __init__(self, model):
        self.calls = [0] * len(model.blocks)
        self.handles = [block.register_forward_hook(functools.partial(self._count, i))
                        for i, block in enumerate(model.blocks)]

    def _count(self, index, module, args, output):
        self.calls[index] += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("kind", list(StepCacheKind), ids=lambda kind: kind.value)
def test_skipped_steps_run_no_block_after_the_first_and_keep_first_and_last(model, kind):
    batch = 2  # two samples: both share each step's decision
    req = request(StepCacheSpec(kind, SKIPPING[kind]), latent_shape=(batch,) + LATENT[1:])
    counter = BlockCalls(model)
    try:
        _, stats, _ = run(model, req)
    finally:
        counter.remove()
    assert stats.skipped and 0 in stats.computed and STEPS - 1 in stats.computed
    assert 2 in stats.computed  # the unconditional branch's first step: nothing cached to reuse
    assert sorted(stats.computed + stats.skipped) == list(range(STEPS))
    assert [step for step, _ in stats.changes] == [i for i in range(1, STEPS - 1) if i != 2]  # the rest are forced
    calls_per_step = {i: batch * (1 if CFG[i] == 1.0 else 2) for i in range(STEPS)}
    computed_calls = sum(calls_per_step[i] for i in stats.computed)
    first_block_calls = sum(calls_per_step.values()) if kind is StepCacheKind.FIRST_BLOCK else computed_calls
    assert counter.calls == [first_block_calls] + [computed_calls] * (TINY.depth - 1)


@torch.no_grad()
@pytest.mark.parametrize("kind", list(StepCacheKind), ids=lambda kind: kind.value)
def test_a_skipped_step_adds_the_residual_cached_at_the_last_computed_step(model, kind):
    # cfg 1 throughout, so each step's prediction is one DiT call: (z_next - z) / (sigma - sigma_next).
    cfg = (1.0,) * STEPS
    req = request(StepCacheSpec(kind, SKIPPING[kind]), cfg=cfg)
    _, stats, latents = run(model, req)
    sigmas, cond = req.sigmas, req.positive
    head_start = 1 if kind is StepCacheKind.FIRST_BLOCK else 0  # blocks before the cached part

    def tokens(i):  # the state the cached part starts from at step i, and that part's residual
        sigma = torch.tensor([sigmas[i]])
        state = model.embed(latents[i], sigma, cond.features, cond.mask)
        model.run_blocks(state, 0, head_start)
        start = state.x
        residual = model.run_blocks(state, head_start, None).x - start
        return model.embed(latents[i], sigma, cond.features, cond.mask), start, residual

    assert stats.skipped
    for j in stats.skipped:
        k = max(i for i in stats.computed if i < j)
        state, start, _ = tokens(j)
        state.x = start + tokens(k)[2]  # this step's start + step k's cached residual
        expected = model.head(state).float()
        got = (latents[j + 1] - latents[j]) / (sigmas[j] - sigmas[j + 1])
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item(), f"step {j} from {k}"
        fresh = model(latents[j], torch.tensor([sigmas[j]]), cond.features, cond.mask).float()
        assert (got - fresh).abs().max().item() > 1e-3  # and it is not the full computation


def test_loop_without_a_cache_reports_every_step_computed(model):
    loop = DenoiseLoop(model, request(None))
    assert loop.cache_stats == CacheStats()
    loop.begin()
    loop.step(0)
    loop.step(1)
    assert loop.cache_stats == CacheStats((0, 1), ())


# --- every degree mix: the same result and the same skipped steps as one rank ----------------------

@torch.no_grad()
def rank_main(world: int) -> dict:
    model = build_model()
    results = {}
    for name, (cfg, ulysses, ring) in LAYOUTS[world].items():
        ctx = ParallelContext(ParallelConfig(world, cfg, ulysses, ring, num_heads=TINY.num_heads))
        for kind, threshold in SKIPPING.items():
            latent, stats, _ = run(model, request(StepCacheSpec(kind, threshold)), ctx=ctx)
            results[(name, kind.value)] = (latent, stats)
        ctx.close()
    return results


@functools.lru_cache(maxsize=None)
def launch(world: int) -> list[dict]:
    return run_ranks(rank_main, world, world, timeout_s=200, collective_timeout_s=60)


@functools.lru_cache(maxsize=None)
def single_rank(kind: StepCacheKind):
    latent, stats, _ = run(build_model(), request(StepCacheSpec(kind, SKIPPING[kind])))
    return latent, stats


LAYOUT_PARAMS = [(world, name) for world in LAYOUTS for name in LAYOUTS[world]]


@pytest.mark.parametrize("world, layout", LAYOUT_PARAMS, ids=[f"world{w}-{n}" for w, n in LAYOUT_PARAMS])
def test_cached_parallel_run_matches_one_rank_and_skips_the_same_steps(world, layout):
    results = launch(world)
    for kind in StepCacheKind:
        expected, expected_stats = single_rank(kind)
        assert expected_stats.skipped  # the comparison covers reuse, not just computing
        for rank, per_rank in enumerate(results):
            latent, stats = per_rank[(layout, kind.value)]
            assert stats == expected_stats, f"{layout} {kind.value} rank {rank}: {stats} vs one rank {expected_stats}"
            # The indicator itself, not just the decisions: every token once (shard padding left out).
            assert [step for step, _ in stats.changes] == [step for step, _ in expected_stats.changes]
            for (step, got), (_, want) in zip(stats.changes, expected_stats.changes):
                assert got == pytest.approx(want, rel=1e-6), f"{layout} {kind.value} rank {rank} step {step}"
            error = (latent - expected).abs().max().item()
            assert error <= TOLERANCE, f"{layout} {kind.value} rank {rank}: max abs error {error:.2e}"


# --- memory --------------------------------------------------------------------------------------

def test_planner_counts_two_shard_sized_tensors_per_branch_per_rank():
    from mochi_xdit.mochi.planner.simulate import count_step

    # Narrow model, long video: the blocks hold the peak, as at full size.
    config = DiTConfig(depth=4, num_heads=4, head_dim=32, hidden_size_x=128, hidden_size_y=64,
                       mlp_hidden_x=256, mlp_hidden_y=128)
    width, height, frames = 848, 480, 49
    tokens = 9 * (height // 16) * (width // 16)
    teacache = StepCacheSpec(StepCacheKind.TEACACHE, 0.06)
    first_block = StepCacheSpec(StepCacheKind.FIRST_BLOCK, 0.06)
    # (degrees, use_cfg, branches this rank runs)
    cases = [(ParallelConfig(1), True, 2), (ParallelConfig(2, 2, 1, 1, num_heads=4), True, 1),
             (ParallelConfig(2, 1, 2, 1, num_heads=4), False, 1)]
    for parallel, use_cfg, branches in cases:
        shard_bytes = -(-tokens // parallel.sp_degree) * config.hidden_size_x * 2  # bf16 [S/SP, Dx]
        base = count_step(parallel, width, height, frames, "bf16", config=config, use_cfg=use_cfg)
        tea = count_step(parallel, width, height, frames, "bf16", config=config, use_cfg=use_cfg, cache=teacache)
        fbc = count_step(parallel, width, height, frames, "bf16", config=config, use_cfg=use_cfg, cache=first_block)
        # A cached residual and the previous step's indicator per branch (while a branch computes,
        # its block-stack input stands where its residual will be).
        assert tea.activation_peak_bytes - base.activation_peak_bytes == 2 * branches * shard_bytes, parallel
        first_block_extra = fbc.activation_peak_bytes - base.activation_peak_bytes
        assert branches * shard_bytes <= first_block_extra <= 2 * branches * shard_bytes, parallel
        assert tea.weight_bytes == base.weight_bytes and tea.flops.get("attention") == base.flops.get("attention")
