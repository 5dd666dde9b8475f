"""The Ray rank pool on real Ray (loopback only): lockstep sampling equals the single-process loop,
interrupts, a SIGKILLed rank, tiled decode across ranks, placement on a 2-node cluster, imports from
a ComfyUI custom_nodes copy, and nothing left behind after shutdown.

Ray starts once for the module (it costs seconds); pools are shared where the test allows.
"""

import gc
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
import threading
import time
from dataclasses import replace

import psutil
import pytest
import ray
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import load_dit, load_vae_decoder, load_vae_encoder
from mochi_xdit.mochi.demo import (DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, DEMO_VAE_ENCODER_CONFIG, random_dit_state_dict,
                                   random_vae_encoder_state_dict, random_vae_state_dict)
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.pipeline import generate
from mochi_xdit.mochi.sampler import SampleRequest
from mochi_xdit.mochi.schedule import parse_cfg_schedule
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.mochi.vae_encoder_tiling import EncodeTileSpec, encode_tiled
from mochi_xdit.mochi.vae_tiling import TileSpec, decode_tiled
from mochi_xdit.workers.actor import RankWorker
from mochi_xdit.workers.capacity import CapacityError
from mochi_xdit.workers.failures import FailureKind, PoolError, RunInterrupted, rank_behind
from mochi_xdit.workers.model_files import ModelFileError
from mochi_xdit.workers.protocol import PoolSpec, Timeouts
from mochi_xdit.workers.ray_runtime import RayAddressError
from mochi_xdit.workers.service import MochiService

HEADS = DEMO_DIT_CONFIG.num_heads
TOLERANCE = 1e-5
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    dit, vae = str(folder / "dit.safetensors"), str(folder / "vae.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), dit)
    save_file({**{f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG, seed=0).items()},
               **{f"encoder.{k}": v for k, v in random_vae_encoder_state_dict(DEMO_VAE_ENCODER_CONFIG, seed=0).items()}},
              vae)  # laid out like ComfyUI's mochi_vae.safetensors: both halves
    return dit, vae


@pytest.fixture(scope="module")
def request_6_steps():
    generator = torch.Generator().manual_seed(1)
    positive = TextCondition(torch.randn(1, 16, 4096, generator=generator), torch.tensor([[1] * 9 + [0] * 7]))
    return SampleRequest(positive, TextCondition.empty(16), latent_shape=(1, 12, 2, 8, 12), seed=7, steps=6, cfg=4.5)


@pytest.fixture(scope="module")
def oracle(model_files, request_6_steps):
    """The single-process pipeline: same weights, same request, no Ray."""
    return generate(load_dit(model_files[0], "fp32", "cpu"), request_6_steps)


@pytest.fixture(scope="module")
def service():
    """One service (Ray connection + live pool) for the module, as ComfyUI holds one per process;
    `service.lines` collects what it says."""
    lines = []
    owner = MochiService(log=lines.append)
    owner.lines = lines
    owner.connect(None)
    yield owner
    owner.shutdown()


def spec_for(model_files, cfg=1, ulysses=2, ring=1, **kwargs) -> PoolSpec:
    parallel = ParallelConfig(cfg * ulysses * ring, cfg, ulysses, ring, num_heads=HEADS)
    timeouts = Timeouts(start_s=120, load_s=120, step_s=60, call_s=60, decode_s=120, collective_s=30)
    return PoolSpec(model_files[0], model_files[1], "fp32", parallel, device="cpu", cpu_threads=1,
                    timeouts=timeouts, **kwargs)


@pytest.fixture(scope="module")
def cache(service):
    """`cache.acquire(spec)`: the service's pool for a spec (reused or rebuilt)."""
    return types.SimpleNamespace(acquire=service.pool, service=service)


def test_private_ray_stays_on_loopback_with_token_auth(service):
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray.nodes())


def test_two_rank_pool_matches_single_process(cache, model_files, request_6_steps, oracle):
    pool = cache.acquire(spec_for(model_files))
    assert [info.rank for info in pool.ranks] == [0, 1]
    assert {info.node_ip for info in pool.ranks} == {"127.0.0.1"}
    assert all(info.niceness == 0 for info in pool.ranks)  # not Ray's default nice 15
    reports = []
    latent = pool.sample(request_6_steps, on_step=reports.append, preview=True)
    assert [r.index for r in reports] == list(range(6)) and all(r.total == 6 for r in reports)
    assert reports[-1].preview.shape == (1, 12, 1, 8, 12)
    assert latent.shape == oracle.shape
    assert (latent - oracle).abs().max().item() <= TOLERANCE


def test_interrupt_after_step_2_of_6_then_full_run_matches(cache, model_files, request_6_steps, oracle):
    pool = cache.acquire(spec_for(model_files))
    seen = []

    def stop_after_two(report):
        seen.append(report.index)
        return report.index < 1  # False after the second step

    with pytest.raises(RunInterrupted, match="after step 2 of 6"):
        pool.sample(request_6_steps, on_step=stop_after_two)
    assert seen == [0, 1]

    class UserCancel(Exception):
        pass

    def raise_at_step_3(report):
        if report.index == 2:
            raise UserCancel("cancel pressed")

    with pytest.raises(UserCancel):
        pool.sample(request_6_steps, on_step=raise_at_step_3)
    assert cache.acquire(spec_for(model_files)) is pool  # still alive, reused
    latent = pool.sample(request_6_steps)
    assert (latent - oracle).abs().max().item() <= TOLERANCE


def test_verbs_out_of_order_raise_with_the_fix(model_files):
    worker = RankWorker(2, spec_for(model_files, ulysses=4))
    with pytest.raises(RuntimeError, match=r"rank 2: step\(\) before begin\(\); call begin\(request\) first"):
        worker.step(0)
    with pytest.raises(RuntimeError, match=r"rank 2: finish\(\) before begin\(\)"):
        worker.finish()
    with pytest.raises(RuntimeError, match=r"rank 2: load\(\) before join_group\(\)"):
        worker.load()
    with pytest.raises(RuntimeError, match="open_store\\(\\) is rank 0's job"):
        worker.open_store()


def test_parallel_tiled_decode_on_2_ranks_equals_single_rank_tiled_decode(cache, model_files):
    pool = cache.acquire(spec_for(model_files))
    latent = torch.randn(1, 12, 3, 10, 14, generator=torch.Generator().manual_seed(3))
    tiles = TileSpec(tile_height=6, tile_width=6, overlap=2, frame_chunk=2)  # 3 x 3 tiles, chunks of 2
    video = pool.decode(latent, tiles)
    expected = decode_tiled(load_vae_decoder(model_files[1], "fp32", "cpu"), latent, tiles)
    assert video.shape == (1, 3, 13, 80, 112)
    assert torch.equal(video, expected)


def test_parallel_tiled_encode_on_2_ranks_equals_single_rank_tiled_encode(cache, model_files):
    pool = cache.acquire(spec_for(model_files))
    video = torch.rand(1, 3, 7, 48, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    tiles = EncodeTileSpec(tile_height=4, tile_width=4, overlap=1)  # 2 x 3 tiles
    latent = pool.encode(video, tiles)
    expected = encode_tiled(load_vae_encoder(model_files[1], "fp32", "cpu"), video, tiles)
    assert latent.shape == (1, 12, 2, 6, 8)
    assert torch.equal(latent, expected)
    auto = pool.encode(video)  # rank 0 sizes the tiles to its memory: one tile here, the untiled encode
    assert torch.equal(auto, load_vae_encoder(model_files[1], "fp32", "cpu").encode(video))
    with pytest.raises(ValueError, match=r"6k \+ 1 frames; got 8; use 7 or 13 frames"):
        pool.encode(video[:, :, :1].repeat(1, 1, 8, 1, 1), tiles)


def test_pool_reused_for_same_spec_rebuilt_for_new_degrees(cache, model_files, request_6_steps, oracle):
    first = cache.acquire(spec_for(model_files))
    assert cache.acquire(spec_for(model_files)) is first
    second = cache.acquire(spec_for(model_files, cfg=2, ulysses=1))  # CFG-parallel pool
    assert second is not first and first.dead
    assert not any(psutil.pid_exists(info.pid) and psutil.Process(info.pid).status() != "zombie"
                   for info in first.ranks)
    latent = second.sample(request_6_steps)
    assert (latent - oracle).abs().max().item() <= TOLERANCE


def test_cfg_1_runs_on_a_cfg_split_pool_and_equals_one_process(cache, model_files, request_6_steps):
    pool = cache.acquire(spec_for(model_files, cfg=2, ulysses=1))
    request = replace(request_6_steps, cfg=1.0)
    expected = generate(load_dit(model_files[0], "fp32", "cpu"), request)
    assert (pool.sample(request) - expected).abs().max().item() <= TOLERANCE


def test_cfg_schedule_with_cfg_1_steps_on_a_cfg_split_pool_equals_one_process(cache, model_files, request_6_steps):
    """genmo's cfg_schedule: guided steps, then cfg-1 steps (rank 1 of the CFG split sends zeros)."""
    pool = cache.acquire(spec_for(model_files, cfg=2, ulysses=1))
    request = replace(request_6_steps, cfg=parse_cfg_schedule("4.5*2,1*2,3,1", 6))
    expected = generate(load_dit(model_files[0], "fp32", "cpu"), request)
    assert (pool.sample(request) - expected).abs().max().item() <= TOLERANCE


def test_two_threads_asking_for_two_specs_wait_for_each_other_instead_of_killing(cache, model_files,
                                                                                  request_6_steps, oracle):
    """Thread A samples on spec_a; thread B asks for spec_b meanwhile. B used to kill A's pool mid-run
    ("the rank's process died"); now B waits for A's run to end (and says so), then rebuilds."""
    spec_a, spec_b = spec_for(model_files, ulysses=2), spec_for(model_files, cfg=2, ulysses=1)
    pool_a = cache.acquire(spec_a)
    a_is_sampling, results, errors = threading.Event(), {}, []

    def thread_a():
        try:
            results["a"] = cache.acquire(spec_a).sample(request_6_steps, on_step=lambda r: a_is_sampling.set())
        except BaseException as error:
            errors.append(error)
            a_is_sampling.set()

    def thread_b():
        a_is_sampling.wait(60)
        try:
            results["b"] = cache.acquire(spec_b).sample(request_6_steps)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == [], errors
    assert (results["a"] - oracle).abs().max().item() <= TOLERANCE
    assert (results["b"] - oracle).abs().max().item() <= TOLERANCE
    assert any("waiting for the run on the live pool" in line for line in cache.service.lines)
    # a caller still holding the replaced pool is told the real cause, not "the rank's process died"
    with pytest.raises(PoolError, match="the service stopped this pool \\(replaced by a pool for another request") as raised:
        pool_a.sample(request_6_steps)
    assert raised.value.kind is FailureKind.STOPPED


def test_a_file_replaced_under_a_live_pool_rebuilds_it_and_a_deleted_one_is_one_typed_line(cache, model_files,
                                                                                           request_6_steps, tmp_path):
    """A new file renamed over the pool's DiT with the same mtime used to reuse the stale pool (old
    weights, bit for bit); a deleted file surfaced as a bare FileNotFoundError."""
    dit = str(tmp_path / "dit.safetensors")
    shutil.copyfile(model_files[0], dit)
    spec = spec_for((dit, model_files[1]), ulysses=1)
    first = cache.acquire(spec)
    newer = str(tmp_path / "newer.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=5), newer)
    mtime = os.stat(dit).st_mtime_ns
    os.utime(newer, ns=(mtime, mtime))
    os.replace(newer, dit)  # same path, same size, same mtime: only the inode (and content) differ
    rebuilt = cache.acquire(spec)
    assert rebuilt is not first and first.dead
    assert "dit.safetensors was replaced by another file (new inode)" in cache.service.lines[-2]
    expected = generate(load_dit(dit, "fp32", "cpu"), request_6_steps)
    assert (rebuilt.sample(request_6_steps) - expected).abs().max().item() <= TOLERANCE
    os.remove(dit)
    with pytest.raises(ModelFileError) as raised:
        cache.acquire(spec)
    assert str(raised.value) == f"dit file {dit}: no such file now; give the path of the .safetensors file"
    assert cache.service.current is rebuilt  # refused before anything was touched


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def test_private_pool_opens_no_port_beyond_loopback(cache, model_files):
    """Rank 0's rendezvous store used to listen on every interface (`*:PORT`); the ranks of a private
    pool now meet through a file store, and gloo's sockets stay on loopback."""
    pool = cache.acquire(spec_for(model_files, cfg=2, ulysses=1))
    ours = {info.pid for info in pool.ranks} | {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert any(c.pid in {info.pid for info in pool.ranks} for c in listening)  # the ranks' own Ray servers
    assert [c for c in listening if not _is_loopback(c.laddr.ip)] == []


def test_a_dead_ray_address_fails_fast_and_keeps_the_pool(cache, model_files):
    """Switching address used to deadlock (the pool cache's lock, taken again by Ray's shutdown hook)
    and a dead address then retried for ~14 minutes; now it is probed first and the pool stays."""
    spec = spec_for(model_files, cfg=2, ulysses=1)
    pool = cache.acquire(spec)
    outcome = {}

    def ask_for_another_cluster():
        try:
            cache.acquire(replace(spec, ray_address="127.0.0.1:1"))
        except BaseException as error:
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=ask_for_another_cluster, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "acquire with a new ray_address hung"
    assert time.monotonic() - started < 30
    error = outcome["error"]
    assert isinstance(error, RayAddressError), error
    assert "'127.0.0.1:1'" in str(error) and "ray start --head" in str(error)
    assert cache.service.current is pool and not pool.dead
    assert cache.acquire(spec) is pool


def test_ranks_that_do_not_fit_are_refused_before_the_pool_is_touched(cache, model_files):
    pool = cache.acquire(spec_for(model_files, cfg=2, ulysses=1))
    world = (os.cpu_count() or 1) + 1
    too_big = PoolSpec(model_files[0], model_files[1], "fp32", ParallelConfig(world, 1, 1, world, num_heads=HEADS))
    with pytest.raises(CapacityError, match=f"world_size={world} needs {world} CPUs"):
        cache.acquire(too_big)
    assert cache.service.current is pool and not pool.dead


def test_the_driver_says_once_what_happens_to_the_pool(cache, model_files):
    spec = spec_for(model_files, cfg=2, ulysses=1)
    cache.service.open(spec)
    said = "\n".join(cache.service.lines)
    assert said.count("connected to a private Ray on 127.0.0.1") == 1
    assert "first pool in this process" in said and "degrees changed" in said
    assert "rank(s) up in" in said and "weights loaded in" in said
    assert cache.service.lines[-1].startswith("Mochi xDiT: reusing the live pool (2 rank(s) on cpu (cfg 2 x")


def test_sigkilled_rank_gives_pool_error_within_15s_and_next_run_rebuilds(cache, model_files, request_6_steps, oracle,
                                                                          monkeypatch):
    spec = spec_for(model_files, cfg=2, ulysses=1)
    pool = cache.acquire(spec)
    victim = pool.ranks[1].pid
    killed_at = []

    def kill_during_step_3(report):
        if report.index == 1:  # rank 1 dies while step 3 runs
            def kill():
                time.sleep(0.05)
                killed_at.append(time.monotonic())
                os.kill(victim, signal.SIGKILL)
            threading.Thread(target=kill).start()

    unhandled = []  # what Ray would print as "Unhandled error ..." (e.g. the survivor's "step(5) out of order")
    monkeypatch.setattr(ray._private.worker, "_unhandled_error_handler", unhandled.append)
    with pytest.raises(PoolError) as raised:
        pool.sample(request_6_steps, on_step=kill_during_step_3)
    elapsed = time.monotonic() - killed_at[0]
    assert elapsed <= 15.0, f"the dead rank was noticed after {elapsed:.1f} s"
    error = raised.value
    assert error.rank == 1 and error.verb == "step"
    assert "rank 1" in str(error) and "died" in str(error)
    assert pool.dead
    for info in pool.ranks:  # every actor of the poisoned group is gone
        assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == "zombie"
    rebuilt = cache.acquire(spec)
    assert rebuilt is not pool
    latent = rebuilt.sample(request_6_steps)
    assert (latent - oracle).abs().max().item() <= TOLERANCE
    gc.collect()  # frees the failed run's references: Ray reports errors nobody retrieved then
    time.sleep(0.5)
    assert unhandled == [], unhandled


def test_rank_that_stops_answering_gives_pool_error_after_the_step_deadline(cache, model_files, request_6_steps):
    hang_spec = PoolSpec(model_files[0], model_files[1], "fp32", ParallelConfig(2, 2, 1, 1, num_heads=HEADS),
                         timeouts=Timeouts(start_s=120, load_s=120, step_s=3, call_s=10, collective_s=30))
    pool = cache.acquire(hang_spec)
    victim = pool.ranks[1].pid
    stopped_at = []

    def freeze_rank_1(report):
        if report.index == 1:
            os.kill(victim, signal.SIGSTOP)  # alive but silent: only the deadline can catch it
            stopped_at.append(time.monotonic())

    with pytest.raises(PoolError, match=r"failed in step\(\): ranks 0, 1 gave no answer within 3 s") as raised:
        pool.sample(request_6_steps, on_step=freeze_rank_1)
    assert time.monotonic() - stopped_at[0] <= 15.0
    assert raised.value.verb == "step" and pool.dead
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"  # SIGKILL beats SIGSTOP
    assert cache.acquire(hang_spec) is not pool


def test_a_stopped_rank_is_blamed_not_the_peer_whose_collective_timed_out(cache, model_files, request_6_steps,
                                                                          monkeypatch):
    """SIGSTOP rank 1 with a step deadline far beyond the collective timeout: rank 0's all-to-all times
    out first, and the error must still name rank 1, the one that stopped answering. Rank 0's queued
    next step then fails too ("step(i) out of order"); Ray used to print that as an "Unhandled error"
    that looked like a second bug."""
    timeouts = Timeouts(start_s=120, load_s=120, step_s=120, call_s=10, collective_s=5)
    spec = PoolSpec(model_files[0], model_files[1], "fp32", ParallelConfig(2, 1, 2, 1, num_heads=HEADS),
                    timeouts=timeouts)
    pool = cache.acquire(spec)
    victim = pool.ranks[1].pid
    stopped_at = []

    def freeze_rank_1(report):
        if report.index == 1:
            os.kill(victim, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

    unhandled = []  # what Ray would print as "Unhandled error ..."
    monkeypatch.setattr(ray._private.worker, "_unhandled_error_handler", unhandled.append)
    with pytest.raises(PoolError) as raised:
        pool.sample(request_6_steps, on_step=freeze_rank_1)
    gc.collect()
    time.sleep(0.5)
    assert unhandled == [], unhandled
    assert raised.value.rank == 1 and raised.value.kind is FailureKind.RANK_SILENT, raised.value
    assert "rank 1 gave no answer, while rank(s) 0 failed waiting for it" in str(raised.value)
    assert time.monotonic() - stopped_at[0] <= timeouts.collective_s + 15.0
    assert pool.dead and not (psutil.pid_exists(victim) and psutil.Process(victim).status() != "zombie")
    assert cache.acquire(spec) is not pool  # rebuilt for the next request


def test_a_peer_stopped_in_a_cached_step_is_blamed_not_the_rank_waiting_in_the_cache_reduction(
        cache, model_files, request_6_steps):
    """TeaCache's indicator is summed over the ranks before any block runs, so with rank 1 stopped,
    rank 0's first collective of the step is the step cache's all_reduce: its timeout must be a
    collective failure that blames rank 1, as an all-to-all's is."""
    from mochi_xdit.mochi.step_cache import StepCacheKind, StepCacheSpec

    timeouts = Timeouts(start_s=120, load_s=120, step_s=120, call_s=10, collective_s=5)
    spec = PoolSpec(model_files[0], model_files[1], "fp32", ParallelConfig(2, 1, 2, 1, num_heads=HEADS),
                    timeouts=timeouts)  # the previous test's spec: its rebuilt pool is reused
    pool = cache.acquire(spec)
    victim = pool.ranks[1].pid

    def freeze_rank_1(report):
        if report.index == 1:
            os.kill(victim, signal.SIGSTOP)

    with pytest.raises(PoolError) as raised:
        pool.sample(replace(request_6_steps, cache=StepCacheSpec(StepCacheKind.TEACACHE, 0.06)),
                    on_step=freeze_rank_1)
    assert raised.value.rank == 1 and raised.value.kind is FailureKind.RANK_SILENT, raised.value
    assert "rank 1 gave no answer, while rank(s) 0 failed waiting for it" in str(raised.value)
    assert pool.dead
    assert cache.acquire(spec) is not pool  # rebuilt for the next request


@pytest.mark.parametrize("entered, expected", [
    ({0: 12, 1: 11}, 1),
    ({0: 11, 1: 12, 2: 12, 3: 13}, 0),
    ({0: 12, 1: 12}, None),  # in step: nobody behind
    ({0: 11, 1: 11, 2: 12}, None),  # a tie at the lowest count singles out nobody
    ({0: 5}, None),
])
def test_the_rank_with_fewest_collectives_entered_is_the_one_behind(entered, expected):
    assert rank_behind(entered) == expected


def test_ranks_dying_together_blame_the_one_that_fell_behind(cache, model_files, request_6_steps):
    """NCCL's watchdog kills every rank waiting in a timed-out collective, so several ranks die at
    once. Simulated on gloo: rank 1 is stopped, rank 0 runs on into a collective and waits there,
    then both are SIGKILLed together. The collective counts (files in the rendezvous folder) name
    rank 1; the blame order alone would name rank 0."""
    from mochi_xdit.mochi.parallel.collective import ledger_path, read_ledger

    spec = spec_for(model_files, cfg=1, ulysses=2)
    pool = cache.acquire(spec)
    pool.sample(replace(request_6_steps, steps=1))
    folder = pool._rendezvous_dir
    first = [read_ledger(ledger_path(folder, rank)) for rank in range(2)]
    assert first[0] == first[1] and first[0][0] == first[0][1] > 0  # in step, nothing in flight
    victims = [info.pid for info in pool.ranks]

    def kill_both_once_rank_0_waits():
        deadline = time.monotonic() + 30
        while read_ledger(ledger_path(folder, 0))[0] == first[0][0] and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    latent = torch.randn(request_6_steps.latent_shape, generator=torch.Generator().manual_seed(3))
    killer = threading.Thread(target=kill_both_once_rank_0_waits)
    with pytest.raises(PoolError) as raised:
        with pool.evaluations(request_6_steps.positive, request_6_steps.negative) as evaluate:
            os.kill(victims[1], signal.SIGSTOP)  # idle between calls: stopped outside any collective
            killer.start()
            evaluate(latent, 0.5, 4.5)  # one call on both ranks: both die in it
    killer.join()
    error = raised.value
    assert error.rank == 1 and error.kind is FailureKind.RANK_SILENT, error
    assert error.cause.startswith("rank 1 fell behind: it had entered"), error.cause
    assert "rank(s) 0, 1 died" in error.cause
    assert pool.dead
    assert cache.acquire(spec) is not pool  # rebuilt for the next request


def _our_ray_processes() -> list[psutil.Process]:
    """Live Ray processes (GCS, raylet, workers, actors) descended from this test process.

    Other children are not Ray's: e.g. multiprocessing's resource tracker, which the gloo tests'
    spawn launcher starts once per pytest process and which lives until pytest exits."""
    me = psutil.Process()
    found = []
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if "ray" in " ".join(child.cmdline()).lower() or child.name().lower().startswith("ray"):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_shutdown_leaves_no_actor_or_ray_process(cache, model_files):
    pool = cache.service.current  # the pool the previous test rebuilt
    assert pool is not None
    pids = [info.pid for info in pool.ranks]
    assert _our_ray_processes(), "a private Ray runs as children of this process"
    cache.service.shutdown()  # stops the live pool, then Ray
    assert pool.dead
    deadline = time.monotonic() + 10
    while _our_ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _our_ray_processes() == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)
    assert not ray.is_initialized()


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    # Hide the editable install, as in a ComfyUI that only has the folder in custom_nodes.
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
    pack, dit = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("ComfyUI-Mochi-xDiT", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI-Mochi-xDiT"] = module
    spec.loader.exec_module(module)  # registers the folder as `mochi_xdit` (root __init__.py)
    from ray.cluster_utils import Cluster
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.workers import ray_runtime
    from mochi_xdit.workers.protocol import PoolSpec
    from mochi_xdit.workers.service import default_service
    assert ray_runtime.PACK_ROOT == pack, ray_runtime.PACK_ROOT
    service = default_service()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        # 4 ranks as 2 Ulysses pairs; a node has room for one pair only (3 CPUs).
        pool = service.pool(PoolSpec(dit, None, "fp32", ParallelConfig(4, 2, 2, 1, num_heads=4),
                                     ray_address=cluster.address))
        print("RANKS", json.dumps([[i.rank, i.node_id, i.node_ip, i.package_dir] for i in pool.ranks]))
    finally:
        service.shutdown()
        cluster.shutdown()
    # The default ComfyUI path: a private Ray on this machine (the pack is found through a symlink).
    import psutil
    pool = service.pool(PoolSpec(dit, None, "fp32", ParallelConfig(1, num_heads=4)))
    print("PRIVATE", pool.ranks[0].package_dir)
    # No shutdown: process exit (atexit) must stop the actor and the private Ray.
    print("LEFT_AT_EXIT", json.dumps(sorted({pool.ranks[0].pid} | {p.pid for p in psutil.Process().children(recursive=True)})))
    """
)


@pytest.fixture(scope="module")
def comfyui_copy_on_cluster(model_files, tmp_path_factory):
    """Run a 4-rank pool from a copy of the pack in custom_nodes/ComfyUI-Mochi-xDiT (editable install
    hidden) against a 2-node loopback cluster, in a fresh process; returns (pack dir, rank rows)."""
    pack = str(tmp_path_factory.mktemp("comfyui") / "custom_nodes" / "ComfyUI-Mochi-xDiT")
    shutil.copytree(REPO_ROOT, pack, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # what the README asks of clusters
    result = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, pack, model_files[0]], capture_output=True,
                            text=True, timeout=400, env=env, cwd=os.path.dirname(pack))
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    ranks = json.loads([l for l in lines if l.startswith("RANKS ")][0].split(" ", 1)[1])
    private = [l for l in lines if l.startswith("PRIVATE ")][0].split(" ", 1)[1]
    left_at_exit = json.loads([l for l in lines if l.startswith("LEFT_AT_EXIT ")][0].split(" ", 1)[1])
    return pack, ranks, private, left_at_exit


def test_cluster_placement_keeps_each_ulysses_group_on_one_node(comfyui_copy_on_cluster):
    _, ranks, _, _ = comfyui_copy_on_cluster
    nodes = [node for _, node, _, _ in ranks]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # each Ulysses pair inside one node
    assert nodes[0] != nodes[2]  # and the pairs did not fit on one node
    assert {ip for _, _, ip, _ in ranks} == {"127.0.0.1"}


def test_actors_import_the_pack_from_a_comfyui_custom_nodes_copy(comfyui_copy_on_cluster):
    pack, ranks, private, _ = comfyui_copy_on_cluster
    # private Ray: the copy itself, through a `mochi_xdit` symlink on the actors' PYTHONPATH
    assert os.path.realpath(private) == os.path.realpath(pack)
    # cluster: shipped to the cluster as a staged copy named mochi_xdit (py_modules), not the editable install
    assert all(os.path.realpath(package_dir) != os.path.realpath(REPO_ROOT) for *_, package_dir in ranks)
    assert all(os.path.basename(package_dir) == "mochi_xdit" for *_, package_dir in ranks)


def test_process_exit_without_shutdown_leaves_no_actor_or_ray_process(comfyui_copy_on_cluster):
    *_, left_at_exit = comfyui_copy_on_cluster
    assert len(left_at_exit) >= 3  # the actor plus Ray's own processes (gcs_server, raylet, ...)
    deadline = time.monotonic() + 10
    alive = left_at_exit
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in left_at_exit if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        time.sleep(0.2)
    assert alive == [], [psutil.Process(pid).cmdline() for pid in alive]


THREAD_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    import torch
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.mochi.sampler import SampleRequest
    from mochi_xdit.mochi.text import TextCondition
    from mochi_xdit.workers.protocol import PoolSpec
    from mochi_xdit.workers.service import MochiService

    service = MochiService()
    spec = PoolSpec(sys.argv[1], None, "fp32", ParallelConfig(1, num_heads=4))
    first = threading.Thread(target=service.pool, args=(spec,))  # a short-lived caller thread starts Ray
    first.start()
    first.join()
    time.sleep(2)  # Ray's processes used to get their parent-death signal when that thread ended
    request = SampleRequest(TextCondition(torch.ones(1, 4, 4096), torch.ones(1, 4, dtype=torch.long)),
                            TextCondition.empty(4), latent_shape=(1, 12, 2, 4, 4), seed=1, steps=2, cfg=4.5)
    latent = service.pool(spec).sample(request)
    print("SAMPLED", tuple(latent.shape), os.environ.get("RAY_AUTH_MODE"), flush=True)
    service.shutdown()
    print("AUTH_MODE_AFTER", os.environ.get("RAY_AUTH_MODE"), flush=True)
    """
)


def test_a_pool_started_from_a_thread_that_ended_keeps_working(model_files):
    """Ray's processes died with the (short-lived) thread that started them, and the next request
    ended the whole Python process with code 1. Runs with token auth switched off in the caller's
    environment: the private Ray still turns it on for itself, and puts the setting back."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    result = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, model_files[0]], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "SAMPLED (1, 12, 2, 4, 4) token" in result.stdout
    assert "AUTH_MODE_AFTER disabled" in result.stdout
