"""`MochiService`: the one owner of this process's Ray connection and its live pool.

Both lifetimes live here, behind one lock that every public method takes exactly once and that
nothing called under it takes again (no hooks, no callbacks back into the service): starting,
reusing, switching and stopping Ray and the pool happen in one place. A request that must wait for
another thread's run on the live pool waits on that lock's condition, which releases it meanwhile.
Ray itself is started, joined and stopped on the service's own thread (`ray_thread.py`). Everything that can refuse a
request without side effects (capacity, the form and reachability of a Ray address) runs before a
working pool or connection is touched, so a bad request never costs the user the pool they had.

The driver says what happens, once per phase, through `log` (ComfyUI's log, or the CLI's stderr):
Ray up, ranks up, weights loaded (with the time each took), pool reused, or rebuilt and why.
"""

import atexit
import logging
import threading
import time
from collections.abc import Callable

from .capacity import RankResources, check_local_capacity
from .placement import check_capacity
from .pool import Pool
from .protocol import PoolSpec
from .ray_runtime import RayAddressError, RayConnection, connect_failure, probe_address, resolve_address
from .ray_thread import RayThread, RayThreadTimeout

EXIT_LOCK_WAIT_S = 10.0  # at interpreter exit, how long to wait for a request in flight before stopping anyway
BUSY_WAIT_S = 600.0  # how long a request for another pool waits for the run on the live pool to end
HANDOUT_GRACE_S = 2.0  # a pool just handed to a thread is not replaced under it before its run starts
CONNECT_TIMEOUT_S = 60.0  # the whole ray.init (private start or cluster join); Ray alone may retry for minutes
CLOSE_TIMEOUT_S = 30.0  # ray.shutdown
_KEY_FIELDS = ("model files", "weight dtype", "degrees", "device", "CPU threads", "Ray address", "timeouts",
               "attention backend")


def _changes(old: tuple | None, new: tuple) -> str:
    """What differs between two `PoolSpec.reuse_key()`s, in words (a changed file says how)."""
    if old is None:
        return "first pool in this process"
    names = [name for name, a, b in zip(_KEY_FIELDS, old, new) if a != b]
    if old[0] != new[0] and len(old[0]) == len(new[0]):
        how = [b.change_from(a) for a, b in zip(old[0], new[0]) if a != b]
        names[0] = f"model files changed ({'; '.join(how)})"
        return ", ".join(names[:1] + [name + " changed" for name in names[1:]])
    return ", ".join(names) + " changed" if names else "same request"


class PoolBusyError(RuntimeError):
    """Another thread's run kept the live pool busy for longer than the service waits to replace it."""


def _layout(spec: PoolSpec) -> str:
    p = spec.parallel
    return (f"{p.world_size} rank(s) on {spec.device} (cfg {p.cfg_degree} x ulysses {p.ulysses_degree} x "
            f"ring {p.ring_degree}), {spec.weight_dtype} weights, {spec.weights.value}"
            + (", compiled" if spec.compile.value == "on" else ""))


class MochiService:
    """Owns the Ray connection and the live pool; reuses the pool while the spec's `reuse_key()` is
    unchanged (the same files with the same content, see `model_files`) and rebuilds it when the
    spec or a file changed, a rank failed, or memory was released.

    Ray is started, joined and stopped on the service's own thread (`RayThread`), never on a
    caller's: Ray's processes die with the thread that started them. A pool in use by another
    thread (a run in progress, or handed out a moment ago) is never replaced under it: a request
    for another pool waits for that run to end (up to `busy_wait_s`, saying that it waits).

    Args:
        log: where the one-line phase messages go (default: the `mochi_xdit` logger at INFO).
        busy_wait_s: how long a request for another pool waits for another thread's run.
        connect_timeout_s: the deadline for the whole `ray.init` (starting a private Ray or
            joining a cluster).
    """

    def __init__(self, log: Callable[[str], None] | None = None, busy_wait_s: float = BUSY_WAIT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self._lock = threading.Condition()
        self._ray: RayConnection | None = None
        self._ray_thread = RayThread()
        self._pool: Pool | None = None
        self._key: tuple | None = None
        self._released_because: str | None = None
        self._handed_out: dict[int, float] = {}  # thread ident -> when it was last handed the live pool
        self._log = log or logging.getLogger("mochi_xdit").info
        self._busy_wait_s, self._connect_timeout_s = busy_wait_s, connect_timeout_s

    # -- requests ------------------------------------------------------------------------------

    def open(self, spec: PoolSpec) -> Pool:
        """The loader's request: the pool for `spec`, built now if needed; says whether it was reused."""
        return self._acquire(spec, announce_reuse=True)

    def pool(self, spec: PoolSpec) -> Pool:
        """The pool for `spec` for one run (sampling, decoding): reused quietly, rebuilt with a reason."""
        return self._acquire(spec, announce_reuse=False)

    def connect(self, address: str | None = None) -> RayConnection:
        """Connect to Ray without building a pool (tests, tools); a changed address stops the pool first."""
        with self._lock:
            return self._connect_locked(resolve_address(address), "Ray address changed")

    @property
    def current(self) -> Pool | None:
        """The live pool, if any (None after a failure, a release or shutdown)."""
        pool = self._pool
        return pool if pool is not None and not pool.dead else None

    def release_pool(self, reason: str) -> bool:
        """Stop the live pool (its ranks free all their memory) and keep Ray; the next request rebuilds
        it. Returns whether a pool was running."""
        with self._lock:
            if self.current is None:
                return False
            self._stop_pool_locked(reason)
            self._released_because = reason
            self._log(f"Mochi xDiT: pool stopped ({reason}); the next prompt loads it again")
            return True

    def shutdown(self) -> None:
        """Stop the pool, then disconnect from Ray (stopping it if we started it)."""
        with self._lock:
            self._stop_pool_locked("the service shut down")
            self._disconnect_locked()
        self._ray_thread.stop()

    def shutdown_at_exit(self) -> None:
        """`shutdown` for atexit: never waits forever on a request still in flight in another thread."""
        if self._lock.acquire(timeout=EXIT_LOCK_WAIT_S):
            try:
                self._stop_pool_locked("the process exits")
                self._disconnect_locked()
            finally:
                self._lock.release()
        elif self._ray is not None:  # a thread holds the lock (mid-request): stop Ray under it anyway
            self._ray_thread.call(self._ray.close, CLOSE_TIMEOUT_S)

    # -- under the lock ------------------------------------------------------------------------

    def _busy_elsewhere(self) -> bool:
        """Whether another thread uses the live pool: a run in progress, or the pool was handed to a
        thread (still alive) a moment ago and its run has not started yet."""
        pool = self.current
        if pool is None:
            return False
        if pool.busy:
            return True
        me, now = threading.get_ident(), time.monotonic()
        alive = {thread.ident for thread in threading.enumerate()}
        return any(ident != me and ident in alive and now - when < HANDOUT_GRACE_S
                   for ident, when in self._handed_out.items())

    def _acquire(self, spec: PoolSpec, announce_reuse: bool) -> Pool:
        with self._lock:
            waited_since = None
            while True:
                key = spec.reuse_key()  # the files as they are now: ModelFileError if gone or unreadable
                if self.current is not None and self._key == key:
                    if announce_reuse:
                        self._log(f"Mochi xDiT: reusing the live pool ({_layout(spec)})")
                    self._handed_out[threading.get_ident()] = time.monotonic()
                    return self._pool
                if not self._busy_elsewhere():
                    break
                now = time.monotonic()
                if waited_since is None:
                    waited_since = now
                    self._log(f"Mochi xDiT: waiting for the run on the live pool ({_layout(self._pool.spec)}) to end "
                              f"before building the one this request needs ({_changes(self._key, key)}); up to "
                              f"{self._busy_wait_s:g} s")
                elif now - waited_since >= self._busy_wait_s:
                    raise PoolBusyError(
                        f"the live pool ({_layout(self._pool.spec)}) was busy with another run for "
                        f"{self._busy_wait_s:g} s, so the pool this request needs ({_changes(self._key, key)}) was "
                        "not built; run the requests one after another, or give both the same pool settings")
                self._lock.wait(0.05)
            if self._released_because is not None:
                reason = self._released_because
            elif self._pool is not None and self._pool.dead and self._key == key:
                reason = "a rank failed in the last request"
            else:
                reason = _changes(self._key if self._pool is not None else None, key)
            target = resolve_address(spec.ray_address)
            if target is None:  # refuse before anything is touched
                check_local_capacity(spec.world_size, spec.device, spec.cpu_threads)
            self._connect_locked(target, reason)
            if target is not None:  # the cluster's live nodes: the pool about to be replaced does not count
                check_capacity(spec.parallel, RankResources.for_device(spec.device, spec.cpu_threads))
            self._stop_pool_locked(f"replaced by a pool for another request ({reason})")
            self._log(f"Mochi xDiT: starting {_layout(spec)}; {reason}")
            self._pool = Pool(spec, self._ray, log=self._log)
            self._key = key
            self._released_because = None
            self._handed_out = {threading.get_ident(): time.monotonic()}
            seconds = self._pool.startup_seconds
            self._log(f"Mochi xDiT: {spec.world_size} rank(s) up in {seconds['ranks']:.1f} s, weights loaded in "
                      f"{seconds['load']:.1f} s")
            for note in self._pool.load_notes:
                self._log(f"Mochi xDiT: {note}")
            return self._pool

    def _connect_locked(self, target: str | None, reason: str) -> RayConnection:
        if self._ray is not None and self._ray.address == target:
            return self._ray
        if self._ray_thread.stuck:
            raise RayAddressError(
                "an earlier attempt to connect to Ray is still running inside Ray (it ran past its deadline and "
                "cannot be interrupted; Ray gives up by itself within minutes); try again later or restart this "
                "process")
        if target is not None:
            probe_address(target)  # a dead address fails here, before the pool or Ray is touched
        if self._ray is not None:
            self._log(f"Mochi xDiT: leaving {self._ray} ({reason})")
        self._stop_pool_locked(f"leaving Ray ({reason})")
        self._disconnect_locked()
        started = time.perf_counter()
        late = threading.Event()

        def connect() -> RayConnection:  # on the Ray thread, which outlives every caller's thread
            connection = RayConnection.connect(target)
            if late.is_set():  # the caller gave up waiting: do not stay joined behind its back
                connection.close()
            return connection

        try:
            self._ray = self._ray_thread.call(connect, self._connect_timeout_s)
        except RayThreadTimeout:
            late.set()
            raise RayAddressError(connect_failure(target, None, self._connect_timeout_s)) from None
        except (ConnectionError, TimeoutError) as error:
            raise RayAddressError(connect_failure(target, error, self._connect_timeout_s)) from error
        except Exception as error:
            from ray.exceptions import AuthenticationError

            if isinstance(error, AuthenticationError):
                raise RayAddressError(connect_failure(target, error, self._connect_timeout_s)) from error
            raise
        where = "a private Ray on 127.0.0.1" if self._ray.private else f"the Ray cluster at {target}"
        self._log(f"Mochi xDiT: connected to {where} in {time.perf_counter() - started:.1f} s")
        return self._ray

    def _stop_pool_locked(self, reason: str) -> None:
        if self._pool is not None:
            self._pool.shutdown(reason)
        self._pool = None
        self._handed_out = {}

    def _disconnect_locked(self) -> None:
        if self._ray is not None:
            self._ray_thread.call(self._ray.close, CLOSE_TIMEOUT_S)
        self._ray = None


class _DefaultService:
    """Holds the process's one default MochiService, made on first use and stopped at exit."""

    def __init__(self):
        self._service: MochiService | None = None
        self._lock = threading.Lock()

    def get(self) -> MochiService:
        with self._lock:
            if self._service is None:
                self._service = MochiService()
                atexit.register(self._service.shutdown_at_exit)
            return self._service


_default = _DefaultService()


def default_service() -> MochiService:
    """The process-wide service (ComfyUI's nodes share it across prompts)."""
    return _default.get()
