"""Model evaluations for a sampler that runs outside the ranks (ComfyUI's own samplers).

The oracle is a plain Euler loop written here from the published rectified-flow formulas, fed by
the ranks' `evaluate` (denoised x0 at one sigma): x_t = sigma * noise + (1 - sigma) * x0,
d = (x - x0) / sigma, x <- x + (sigma_next - sigma) * d (k-diffusion's Euler, what ComfyUI's
`euler` sampler runs). On the same sigmas it must equal the Euler loop that runs whole on the ranks
(`DenoiseLoop`), in fp32 to 1e-5: in-process on a `RankWorker`, and once on a 2-rank Ray pool
(CFG parallel: each rank runs one branch, the combine happens on the ranks).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import load_dit
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.guidance import EvaluationRequest
from mochi_xdit.mochi.latent import comfy_noise, is_empty_latent, to_model_space, to_vae_space
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.pipeline import generate
from mochi_xdit.mochi.sampler import SampleRequest
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.workers.actor import RankWorker
from mochi_xdit.workers.protocol import PoolSpec, Timeouts

TOLERANCE = 1e-5
HEADS = DEMO_DIT_CONFIG.num_heads


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "dit.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), path)
    return path


@pytest.fixture(scope="module")
def dit(dit_file):
    return load_dit(dit_file, "fp32", "cpu")


def prompts() -> tuple[TextCondition, TextCondition]:
    generator = torch.Generator().manual_seed(1)
    positive = TextCondition(torch.randn(1, 16, 4096, generator=generator), torch.tensor([[1] * 9 + [0] * 7]))
    negative = TextCondition(torch.randn(1, 16, 4096, generator=generator), torch.tensor([[1] * 3 + [0] * 13]))
    return positive, negative


def euler_on(evaluate, request: SampleRequest) -> torch.Tensor:
    """k-diffusion Euler on the request's sigmas, the model being `evaluate(x, sigma, cfg) -> x0`.
    Returns the VAE-space latent."""
    sigmas = request.sigmas
    noise = comfy_noise(request.shape, request.seed)  # [B, 12, T, H, W]
    clean = torch.zeros(request.shape) if request.init_latent is None else request.init_latent.float()
    if not is_empty_latent(clean):
        clean = to_model_space(clean)
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * clean
    for i, scale in enumerate(request.cfg_scales):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = evaluate(x, torch.full((x.shape[0],), sigma), scale)
        d = (x - x0) / sigma  # the velocity noise - x0
        x = x + (sigma_next - sigma) * d
    return to_vae_space(x)


CASES = [
    ("linear_quadratic", 1.0, 1, 1.0),
    ("linear_quadratic", 4.5, 1, 1.0),
    ("simple", 1.0, 1, 1.0),
    ("simple", 4.5, 1, 1.0),
    ("simple", 4.5, 2, 0.6),  # batch 2, img2img from a non-empty latent
]


@pytest.mark.parametrize("schedule,cfg,batch,denoise", CASES)
def test_rank_evaluations_under_euler_equal_the_on_rank_loop(dit_file, dit, schedule, cfg, batch, denoise):
    positive, negative = prompts()
    shape = (batch, 12, 2, 8, 12)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(3)) if denoise < 1 else torch.zeros(shape)
    request = SampleRequest(positive, negative, init_latent=init, seed=7, steps=4, cfg=cfg, schedule=schedule,
                            denoise=denoise)
    on_rank = generate(dit, request)

    worker = RankWorker(0, PoolSpec(dit_file, None, "fp32", ParallelConfig(1, num_heads=HEADS)))
    worker.load()
    worker.begin_evaluations(EvaluationRequest(positive, negative))

    def evaluate(x, sigma, scale):
        x0, seconds = worker.evaluate(x.numpy(), sigma.tolist(), scale)  # numpy in and out, as through Ray
        assert x0.dtype == np.float32 and x0.shape == x.shape and seconds > 0
        return torch.from_numpy(x0)

    driven = euler_on(evaluate, request)
    assert (driven - on_rank).abs().max().item() <= TOLERANCE * max(1.0, on_rank.abs().max().item())
    assert on_rank.abs().max().item() > 0.1  # a real latent, not zeros on both sides

    # both branches unguided, combined here, give the same step
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    branches, _ = worker.evaluate(x, [0.7], None)  # [2, B, 12, T, H, W]; a tensor works too
    guided, _ = worker.evaluate(x, [0.7], 4.5)
    branches, guided = torch.from_numpy(branches), torch.from_numpy(guided)
    assert branches.shape == (2, *shape)
    assert (branches[1] + 4.5 * (branches[0] - branches[1]) - guided).abs().max().item() <= TOLERANCE
    notes = worker.end_evaluations()  # the kernel rank 0 measured at its first evaluation, for the driver's log
    assert len(notes) == 1 and notes[0].startswith("attention kernel "), notes
    assert worker.end_evaluations() == ()  # handed over once
    with pytest.raises(RuntimeError, match="begin_evaluations"):
        worker.evaluate(x, [0.7], 4.5)


def test_evaluation_checks_its_inputs(dit_file):
    worker = RankWorker(0, PoolSpec(dit_file, None, "fp32", ParallelConfig(1, num_heads=HEADS)))
    positive, negative = prompts()
    with pytest.raises(RuntimeError, match="before load"):
        worker.begin_evaluations(EvaluationRequest(positive, negative))
    worker.load()
    with pytest.raises(TypeError, match="EvaluationRequest"):
        worker.begin_evaluations((positive, negative))
    with pytest.raises(TypeError, match="TextCondition"):
        EvaluationRequest(positive, negative.features)
    narrow = TextCondition(torch.zeros(1, 4, 64), torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="4096"):
        worker.begin_evaluations(EvaluationRequest(narrow, negative))
    worker.begin_evaluations(EvaluationRequest(positive, negative))
    with pytest.raises(ValueError, match="3 sigmas for a batch of 2"):
        worker.evaluate(torch.zeros(2, 12, 1, 4, 4), [0.5, 0.4, 0.3], 4.5)


# -- one 2-rank Ray pool (CFG parallel: the combine runs on the ranks) ---------------------------


@pytest.fixture(scope="module")
def cfg_pool(dit_file):
    from mochi_xdit.workers.service import MochiService

    service = MochiService(log=lambda line: None)
    timeouts = Timeouts(start_s=120, load_s=120, step_s=60, call_s=60, decode_s=120, collective_s=30)
    yield service.pool(PoolSpec(dit_file, None, "fp32", ParallelConfig(2, 2, 1, 1, num_heads=HEADS), device="cpu",
                                cpu_threads=1, timeouts=timeouts))
    service.shutdown()


@pytest.mark.parametrize("schedule", ["linear_quadratic", "simple"])
def test_pool_evaluations_under_euler_equal_the_on_rank_loop(cfg_pool, dit, schedule):
    positive, negative = prompts()
    request = SampleRequest(positive, negative, latent_shape=(1, 12, 2, 8, 12), seed=11, steps=3, cfg=4.5,
                            schedule=schedule)
    on_rank = generate(dit, request)
    assert (cfg_pool.sample(request) - on_rank).abs().max().item() <= TOLERANCE

    seconds = []
    with cfg_pool.evaluations(positive, negative, on_evaluation=seconds.append) as evaluate:
        driven = euler_on(evaluate, request)
        x = torch.randn(request.shape, generator=torch.Generator().manual_seed(5))
        branches = evaluate(x, 0.5, None)  # [2, B, 12, T, H, W]
        guided = evaluate(x, 0.5, 4.5)
    assert (driven - on_rank).abs().max().item() <= TOLERANCE * max(1.0, on_rank.abs().max().item())
    assert (branches[1] + 4.5 * (branches[0] - branches[1]) - guided).abs().max().item() <= TOLERANCE
    assert len(seconds) == request.steps + 2 and min(seconds) > 0


def test_pool_stays_usable_after_an_exception_inside_evaluations(cfg_pool, dit):
    positive, negative = prompts()
    request = SampleRequest(positive, negative, latent_shape=(1, 12, 2, 8, 12), seed=11, steps=2, cfg=4.5)
    with pytest.raises(KeyError, match="cancelled by the test"):
        with cfg_pool.evaluations(positive, negative) as evaluate:
            evaluate(torch.zeros(request.shape), 1.0, 4.5)
            raise KeyError("cancelled by the test")  # e.g. ComfyUI's interrupt between evaluations
    assert not cfg_pool.dead
    assert (cfg_pool.sample(request) - generate(dit, request)).abs().max().item() <= TOLERANCE


def test_private_pool_evaluations_share_files_not_the_object_store(cfg_pool, dit, monkeypatch):
    """A private pool's ranks read the latent from the driver's shared file (written once for both
    ranks) and rank 0 writes x0 back there: no object store put per evaluation. Results stay the
    caller's own when later evaluations reuse the buffers or change their shape; the files go at the end."""
    import glob

    import ray

    from mochi_xdit.mochi.guidance import GuidedDiT
    from mochi_xdit.workers.shared_latent import SHARED_MEMORY_DIR

    positive, negative = prompts()
    local = GuidedDiT(dit, positive, negative)
    x = torch.randn(2, 12, 2, 8, 12, generator=torch.Generator().manual_seed(6))
    before = set(glob.glob(f"{SHARED_MEMORY_DIR}/mochi_xdit_latents_*"))
    with cfg_pool.evaluations(positive, negative) as evaluate:
        monkeypatch.setattr(ray, "put", lambda *args, **kwargs: pytest.fail("a latent went through the object store"))
        first = evaluate(x, [0.7, 0.4], 4.5)
        kept = first.clone()
        second = evaluate(x * 0.5, [0.7, 0.4], 4.5)  # same buffers
        single = evaluate(x[:1], 0.3, None)  # new shapes, new files
        assert set(glob.glob(f"{SHARED_MEMORY_DIR}/mochi_xdit_latents_*")) - before  # the block's folder
    assert torch.equal(first, kept)  # not overwritten by the later evaluations
    assert (first - local.denoised(x, [0.7, 0.4], 4.5)).abs().max().item() <= TOLERANCE
    assert (second - local.denoised(x * 0.5, [0.7, 0.4], 4.5)).abs().max().item() <= TOLERANCE
    assert (single - local.denoised_branches(x[:1], [0.3])).abs().max().item() <= TOLERANCE
    assert set(glob.glob(f"{SHARED_MEMORY_DIR}/mochi_xdit_latents_*")) == before


def _cluster_ranks_evaluate(dit_file: str, latent: np.ndarray, sigmas: list[float]):
    """A rank of a CFG-split cluster pool (run under `run_ranks`): rank 0 gets the latent, rank 1
    only its shape, and receives it by broadcast; returns (rank 0's x0 or None, the buffer's pointer
    before and after a second call, the collectives counted)."""
    import torch.distributed as dist

    from mochi_xdit.mochi.parallel.layout import ParallelContext
    from mochi_xdit.workers.shared_latent import BroadcastLatent

    rank = dist.get_rank()
    spec = PoolSpec(dit_file, None, "fp32", ParallelConfig(2, 2, 1, 1, num_heads=HEADS), device="cpu", cpu_threads=1)
    worker = RankWorker(rank, spec)
    worker.ctx = ParallelContext(spec.parallel, "cpu")
    worker.load()
    worker.begin_evaluations(EvaluationRequest(*prompts()))
    given = latent if rank == 0 else BroadcastLatent(latent.shape)
    out, _ = worker.evaluate(given, sigmas, 4.5)
    first = worker._latent_buffer.data_ptr()
    worker.evaluate(given, sigmas, 4.5)
    reused = worker._latent_buffer.data_ptr() == first
    return out, reused, worker.ctx.collectives.completed


def test_cluster_pool_latent_goes_to_rank_0_only_and_is_broadcast(dit_file, dit):
    from mochi_xdit.mochi.guidance import GuidedDiT
    from mochi_xdit.mochi.parallel.testing import run_ranks

    x = torch.randn(2, 12, 2, 8, 12, generator=torch.Generator().manual_seed(9))
    (out, reused0, count0), (none, reused1, count1) = run_ranks(_cluster_ranks_evaluate, 2, dit_file, x.numpy(),
                                                                [0.7, 0.4], timeout_s=180)
    expected = GuidedDiT(dit, *prompts()).denoised(x, [0.7, 0.4], 4.5)
    assert none is None and reused0 and reused1 and count0 == count1 > 0
    assert np.abs(out - expected.numpy()).max() <= TOLERANCE


def test_a_full_shared_memory_falls_back_to_the_object_store(cfg_pool, dit, monkeypatch):
    """A container's /dev/shm is often 64 MB: when the buffers do not fit, the space reservation
    fails (not a SIGBUS at the first write) and the latents go through Ray instead."""
    import errno
    import os

    from mochi_xdit.mochi.guidance import GuidedDiT
    from mochi_xdit.workers import shared_latent

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shared_latent.os, "posix_fallocate", full)
    positive, negative = prompts()
    x = torch.randn(1, 12, 2, 8, 12, generator=torch.Generator().manual_seed(10))
    with cfg_pool.evaluations(positive, negative) as evaluate:
        first, second = evaluate(x, 0.6, 4.5), evaluate(x, 0.6, 4.5)
    expected = GuidedDiT(dit, positive, negative).denoised(x, [0.6], 4.5)
    assert (first - expected).abs().max().item() <= TOLERANCE and torch.equal(first, second)
