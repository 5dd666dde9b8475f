"""The service's own thread for Ray (no Ray here): calls from short-lived caller threads all run on
one long-lived thread, and a call past its deadline is reported, left to finish, and replaced."""

import threading
import time

import pytest

from mochi_xdit.workers.ray_thread import RayThread, RayThreadTimeout


def test_calls_from_threads_that_end_run_on_one_thread_that_lives_on():
    owner = RayThread()
    seen = []
    callers = [threading.Thread(target=lambda: seen.append(owner.call(threading.current_thread))) for _ in range(3)]
    for caller in callers:
        caller.start()
        caller.join()
    assert len({id(thread) for thread in seen}) == 1 and seen[0] not in callers
    assert seen[0].is_alive() and seen[0].daemon  # outlives every caller
    owner.stop()
    assert not seen[0].is_alive()


def test_an_exception_reaches_the_caller():
    owner = RayThread()
    with pytest.raises(ConnectionError, match="no cluster"):
        owner.call(lambda: (_ for _ in ()).throw(ConnectionError("no cluster")))
    owner.stop()


def test_a_call_past_its_deadline_is_reported_left_to_finish_and_replaced():
    owner = RayThread()
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(RayThreadTimeout):
        owner.call(lambda: release.wait(30), timeout_s=0.2)
    assert time.monotonic() - started < 5 and owner.stuck
    release.set()
    deadline = time.monotonic() + 5
    while owner.stuck and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not owner.stuck  # the overdue thread ended after its call
    assert owner.call(lambda: 42, timeout_s=5) == 42  # a fresh thread serves the next call
    owner.stop()
