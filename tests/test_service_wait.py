"""The service's wait for a pool in use, without Ray: a request for another pool waits (bounded, and
says so) while another thread's run holds the live pool, and is answered with a typed error naming
the cause when the wait runs out. The real two-thread run on Ray is in tests/test_pool.py."""

import threading
import time

import pytest
from safetensors.torch import save_file

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.workers.protocol import PoolSpec
from mochi_xdit.workers.service import MochiService, PoolBusyError


class RunningPool:
    """Stands in for a live pool whose run holds it (as `Pool.run` holds its lock)."""

    def __init__(self, spec):
        self.spec, self.dead, self.busy, self.stopped = spec, False, True, None

    def shutdown(self, reason):
        self.stopped, self.dead = reason, True


@pytest.fixture
def specs(tmp_path):
    dit = str(tmp_path / "dit.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), dit)
    heads = DEMO_DIT_CONFIG.num_heads
    return (PoolSpec(dit, None, "fp32", ParallelConfig(2, 2, 1, 1, num_heads=heads)),
            PoolSpec(dit, None, "fp32", ParallelConfig(2, 1, 2, 1, num_heads=heads)))


def _service_running(spec, busy_wait_s):
    lines = []
    service = MochiService(log=lines.append, busy_wait_s=busy_wait_s)
    service._pool, service._key = RunningPool(spec), spec.reuse_key()
    return service, lines


def test_a_request_for_another_pool_gives_up_after_the_bounded_wait_and_leaves_the_run_alone(specs):
    service, lines = _service_running(specs[0], busy_wait_s=0.5)
    running = service.current
    started = time.monotonic()
    with pytest.raises(PoolBusyError, match=r"was busy with another run for 0.5 s, so the pool this request needs "
                                            r"\(degrees changed\) was not built"):
        service.pool(specs[1])
    assert 0.5 <= time.monotonic() - started < 5
    assert lines == ["Mochi xDiT: waiting for the run on the live pool (2 rank(s) on cpu (cfg 2 x ulysses 1 x ring 1), "
                     "fp32 weights, replicated) to end before building the one this request needs (degrees changed); up to 0.5 s"]
    assert running.stopped is None and service.current is running  # never killed under its run


def test_the_same_request_is_served_at_once_while_the_pool_runs(specs):
    service, lines = _service_running(specs[0], busy_wait_s=30)
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(pool=service.pool(specs[0])))
    thread.start()
    thread.join(10)
    assert answer["pool"] is service.current and lines == []
