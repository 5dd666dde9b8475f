"""Rank memory hygiene that a CPU machine can check: the actors' allocator setting, the run's
tensors dropped (and the GPU cache emptied) before decoding, and the requested attention backend
reaching the rank's sampling loop (or refused when the rank cannot run it)."""

import types

import pytest
import torch

from mochi_xdit.mochi.demo import demo_checkpoints
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import AttentionBackend
from mochi_xdit.mochi.sampler import SampleRequest
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.workers import actor as actor_module
from mochi_xdit.workers.actor import RankWorker, release_cached_memory
from mochi_xdit.workers.protocol import PoolSpec
from mochi_xdit.workers.ray_runtime import actor_runtime_env


@pytest.mark.parametrize("private, importable", [(True, True), (False, True), (False, False)])
def test_actors_get_expandable_segments_not_the_drivers_allocator(private, importable, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")  # what ComfyUI may run with
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")  # torch 2.13 reads this name first
    env = actor_runtime_env(private, importable)["env_vars"]
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"


def test_release_cached_memory_empties_the_cuda_cache_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    release_cached_memory(torch.device("cpu"))
    assert calls == []
    release_cached_memory(torch.device("cuda", 0))
    assert calls == ["empty"]


@pytest.fixture(scope="module")
def demo_spec(tmp_path_factory) -> PoolSpec:
    dit, vae = demo_checkpoints(tmp_path_factory.mktemp("demo"))
    return PoolSpec(str(dit), str(vae), "fp32", ParallelConfig(1, num_heads=4), device="cpu", cpu_threads=1)


def tiny_request() -> SampleRequest:
    positive = TextCondition(torch.randn(1, 4, 4096, generator=torch.Generator().manual_seed(0)),
                             torch.ones(1, 4, dtype=torch.int64))
    return SampleRequest(positive, TextCondition.empty(4), latent_shape=(1, 12, 1, 4, 4), steps=2, cfg=2.0)


def test_finish_and_cancel_drop_the_run_and_release_its_memory(demo_spec, monkeypatch):
    released = []
    monkeypatch.setattr(actor_module, "release_cached_memory", lambda device: released.append(device))
    worker = RankWorker(0, demo_spec)
    worker.load()
    worker.begin(tiny_request())
    assert worker._loop.attention is worker.attention  # the rank's attention config reaches the model calls
    assert worker.attention.backend is AttentionBackend.AUTO and worker.attention.installed is not None
    worker.step(0)
    worker.step(1)
    result = worker.finish()
    latent = result.latent
    assert result.cache_stats is None  # no step cache asked for: nothing to report
    assert latent.shape == (1, 12, 1, 4, 4) and worker._loop is None
    assert released == [worker.device]
    worker.begin(tiny_request())
    worker.cancel()
    assert worker._loop is None and released == [worker.device, worker.device]


def test_a_rank_refuses_an_attention_backend_it_cannot_run(demo_spec):
    # PoolSpec has no attention_backend field yet; the rank reads one where the spec carries it.
    spec = types.SimpleNamespace(device="cpu", cpu_threads=1, world_size=2, attention_backend="xfuser")
    with pytest.raises(ValueError, match="rank 1: attention_backend=xfuser runs on CUDA GPUs only"):
        RankWorker(1, spec)


def test_nccl_ranks_initialise_eagerly_with_their_device():
    """device_id makes NCCL build its communicator in init_process_group: a bad GPU fails at start."""
    from mochi_xdit.workers.actor import process_group_backend

    assert process_group_backend(torch.device("cuda", 0)) == ("nccl", torch.device("cuda", 0))
    assert process_group_backend(torch.device("cpu")) == ("gloo", None)
