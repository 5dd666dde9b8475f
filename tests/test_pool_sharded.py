"""A Ray pool with sharded weights (2 CPU ranks, CFG split, FSDP2 over both) computes what one
process computes: a per-step cfg schedule with cfg-1 steps, a LoRA swapped in and out, the step
cache, ComfyUI-sampler evaluations, an interrupted run, and a SIGKILLed rank (the pool rebuilds,
the error names the rank). One pool for the module (plus its rebuild at the end).
"""

import json
import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import load_dit
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.guidance import GuidedDiT
from mochi_xdit.mochi.lora import LoraSpec, LoraSwitch
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.pipeline import generate
from mochi_xdit.mochi.sampler import SampleRequest
from mochi_xdit.mochi.step_cache import StepCacheKind, StepCacheSpec
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.mochi.weight_placement import WeightPlacement
from mochi_xdit.workers.failures import PoolError, RunInterrupted
from mochi_xdit.workers.protocol import PoolSpec, Timeouts
from mochi_xdit.workers.service import MochiService

pytestmark = pytest.mark.timeout(300)

HEADS = DEMO_DIT_CONFIG.num_heads
TOLERANCE = 1e-5
CFG_SCHEDULE = (4.5, 1.0, 4.5, 1.0, 4.5, 4.5)  # cfg-1 steps: the unconditional rank joins the gathers anyway


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo DiT and a genmo-style LoRA on its attention projections."""
    folder = tmp_path_factory.mktemp("sharded")
    dit = str(folder / "dit.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), dit)
    generator = torch.Generator().manual_seed(3)
    model = load_dit(dit, "fp32", "cpu")
    tensors = {}
    for i in range(DEMO_DIT_CONFIG.depth):
        for name in ("qkv_x", "proj_x"):
            layer = getattr(model.blocks[i].attn, name)
            tensors[f"blocks.{i}.attn.{name}.lora_A"] = torch.randn(4, layer.in_features, generator=generator) * 0.1
            tensors[f"blocks.{i}.attn.{name}.lora_B"] = torch.randn(layer.out_features, 4, generator=generator) * 0.1
    lora = str(folder / "lora.safetensors")
    kwargs = {"qkv_proj_lora_rank": 4, "qkv_proj_lora_alpha": 4.0, "out_proj_lora_rank": 4, "out_proj_lora_alpha": 4.0}
    save_file(tensors, lora, metadata={"kwargs": json.dumps(kwargs)})
    return dit, lora


@pytest.fixture(scope="module")
def request_6_steps():
    generator = torch.Generator().manual_seed(1)
    positive = TextCondition(torch.randn(1, 16, 4096, generator=generator), torch.tensor([[1] * 9 + [0] * 7]))
    return SampleRequest(positive, TextCondition.empty(16), latent_shape=(1, 12, 2, 8, 12), seed=7, steps=6,
                         cfg=CFG_SCHEDULE)


def local_model(files, loras=()):
    model = load_dit(files[0], "fp32", "cpu")
    LoraSwitch(model, torch.float32).set(loras)
    return model


@pytest.fixture(scope="module")
def service():
    lines = []
    owner = MochiService(log=lines.append)
    owner.lines = lines
    owner.connect(None)
    yield owner
    owner.shutdown()


def sharded_spec(files) -> PoolSpec:
    timeouts = Timeouts(start_s=120, load_s=120, step_s=60, call_s=60, decode_s=120, collective_s=30)
    return PoolSpec(files[0], None, "fp32", ParallelConfig(2, 2, 1, 1, num_heads=HEADS), device="cpu",
                    cpu_threads=1, timeouts=timeouts, weights=WeightPlacement.SHARDED)


def error(a, b) -> float:
    return (a - b).abs().max().item()


def test_sharded_pool_runs_loras_and_the_step_cache_like_one_process(service, files, request_6_steps):
    pool = service.pool(sharded_spec(files))
    # rank 0's placement note reaches the driver's log (ComfyUI's, the CLI's)
    assert any(line.startswith("Mochi xDiT: rank 0: weights sharded") for line in service.lines), service.lines
    lora = (LoraSpec(files[1], 0.8),)
    base = generate(local_model(files), request_6_steps)
    assert error(pool.sample(request_6_steps), base) <= TOLERANCE
    # the kernel rank 0 measured at its first forward reaches the driver's log with the run's result
    assert any(line.startswith("Mochi xDiT: attention kernel ") for line in service.lines), service.lines
    assert error(pool.sample(request_6_steps, loras=lora), generate(local_model(files, lora), request_6_steps)) <= TOLERANCE
    assert error(pool.sample(request_6_steps), base) <= TOLERANCE  # swapped back out
    cached = replace(request_6_steps, cache=StepCacheSpec(StepCacheKind.FIRST_BLOCK, 0.9))
    result = pool.run(cached)
    assert result.cache_stats.skipped, "the cache skipped nothing; raise its threshold"
    assert error(result.latent, generate(local_model(files), cached)) <= TOLERANCE


def test_sharded_pool_evaluations_equal_one_process(service, files, request_6_steps):
    pool = service.pool(sharded_spec(files))
    guided = GuidedDiT(local_model(files), request_6_steps.positive, request_6_steps.negative)
    x = torch.randn(request_6_steps.shape, generator=torch.Generator().manual_seed(5))
    with pool.evaluations(request_6_steps.positive, request_6_steps.negative) as evaluate:
        for cfg in (1.0, 4.5):  # cfg 1: the unconditional rank evaluates in lockstep, unused
            assert error(evaluate(x, 0.5, cfg), guided.denoised(x, [0.5], cfg)) <= TOLERANCE


def test_sharded_pool_interrupted_then_killed_rank_rebuilds(service, files, request_6_steps):
    spec = sharded_spec(files)
    pool = service.pool(spec)
    expected = generate(local_model(files), request_6_steps)
    with pytest.raises(RunInterrupted, match="after step 2 of 6"):
        pool.sample(request_6_steps, on_step=lambda report: report.index < 1)
    assert error(pool.sample(request_6_steps), expected) <= TOLERANCE

    victim = pool.ranks[1].pid

    def kill_during_step_3(report):
        if report.index == 1:
            threading.Thread(target=lambda: (time.sleep(0.05), os.kill(victim, signal.SIGKILL))).start()

    with pytest.raises(PoolError) as raised:
        pool.sample(request_6_steps, on_step=kill_during_step_3)
    assert raised.value.rank == 1 and "rank 1" in str(raised.value)
    rebuilt = service.pool(spec)
    assert rebuilt is not pool
    assert error(rebuilt.sample(request_6_steps), expected) <= TOLERANCE
