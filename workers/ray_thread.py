"""`RayThread`: the service's own long-lived thread, where Ray is started, joined and stopped.

Why a thread of our own: Ray sets Linux's parent-death signal on the processes it starts (GCS,
raylet), and Linux fires it when the *thread* that spawned them exits, not the process. A private
Ray started from a caller's short-lived thread (a web server's request thread, an executor's
worker, a notebook's thread pool) died with that thread, and the next request ended the whole
Python process (code 1, no exception). Here `ray.init` and `ray.shutdown` always run on one daemon
thread that lives as long as the Ray it started, so no caller's thread owns Ray.

Every call also gets a deadline: `ray.init(address=...)` can retry for minutes inside Ray; the
caller gets `RayThreadTimeout` when the deadline runs out, and the thread is left to finish (it
cannot be interrupted) and is replaced for the next call.
"""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future


class RayThreadTimeout(TimeoutError):
    """A call on the Ray thread did not return within its deadline (it goes on in the background)."""


class RayThread:
    """One daemon thread that runs submitted calls in order, for as long as the service lives.

    Args:
        name: the thread's name (shown in stack dumps).
    """

    def __init__(self, name: str = "mochi_xdit-ray"):
        self._name = name
        self._calls: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._overdue: threading.Thread | None = None  # a thread left running a call past its deadline

    @property
    def stuck(self) -> bool:
        """True while a call that ran past its deadline still runs (inside Ray, which cannot be interrupted)."""
        return self._overdue is not None and self._overdue.is_alive()

    def call(self, function: Callable, timeout_s: float | None = None):
        """Run `function()` on the Ray thread and return its result (or raise its exception).

        Raises:
            RayThreadTimeout: it did not return within `timeout_s` (None: no deadline). It keeps
                running on that thread, which is given up (`stuck` says until when); the next call
                gets a fresh thread.
        """
        if threading.current_thread() is self._thread:  # already on it (a call made from a call)
            return function()
        if self._thread is None or not self._thread.is_alive():
            self._calls = queue.SimpleQueue()
            self._thread = threading.Thread(target=_serve, args=(self._calls,), name=self._name, daemon=True)
            self._thread.start()
        done: Future = Future()
        self._calls.put((function, done))
        try:
            return done.result(timeout=timeout_s)
        except TimeoutError:
            if done.done():  # the function itself raised a TimeoutError
                raise
            self._calls.put((None, None))  # that thread ends once the overdue call returns
            self._overdue, self._thread = self._thread, None
            raise RayThreadTimeout(f"still running after {timeout_s:g} s") from None

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread once the calls already queued are done (call after Ray is stopped)."""
        thread, calls = self._thread, self._calls
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        calls.put((None, None))
        thread.join(timeout_s)
        self._thread = None


def _serve(calls: queue.SimpleQueue) -> None:
    while True:
        function, done = calls.get()
        if function is None:
            return
        if not done.set_running_or_notify_cancel():
            continue
        try:
            done.set_result(function())
        except BaseException as error:  # handed to the caller, who raises it
            done.set_exception(error)
