"""`MochiService`: the one owner of this process's Ray connection and its live pool.

Both lifetimes live here, behind one lock that every public method takes exactly once and that
nothing called under it takes again (no hooks, no callbacks back into the service): starting,
reusing, switching and stopping Ray and the pool happen in one place. Everything that can refuse a
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
from .ray_runtime import RayConnection, probe_address, resolve_address

EXIT_LOCK_WAIT_S = 10.0  # at interpreter exit, how long to wait for a request in flight before stopping anyway
_KEY_FIELDS = ("model files", "weight dtype", "degrees", "device", "CPU threads", "Ray address", "timeouts",
               "attention backend")


def _changes(old: tuple | None, new: tuple) -> str:
    """What differs between two `PoolSpec.reuse_key()`s, in words."""
    if old is None:
        return "first pool in this process"
    names = [name for name, a, b in zip(_KEY_FIELDS, old, new) if a != b]
    return ", ".join(names) + " changed" if names else "same request"


def _layout(spec: PoolSpec) -> str:
    p = spec.parallel
    return (f"{p.world_size} rank(s) on {spec.device} (cfg {p.cfg_degree} x ulysses {p.ulysses_degree} x "
            f"ring {p.ring_degree}), {spec.weight_dtype} weights {spec.weights.value}")


class MochiService:
    """Owns the Ray connection and the live pool; reuses the pool while the spec's `reuse_key()` is
    unchanged and rebuilds it when the spec changed, a rank failed, or memory was released.

    Args:
        log: where the one-line phase messages go (default: the `mochi_xdit` logger at INFO).
    """

    def __init__(self, log: Callable[[str], None] | None = None):
        self._lock = threading.Lock()
        self._ray: RayConnection | None = None
        self._pool: Pool | None = None
        self._key: tuple | None = None
        self._released_because: str | None = None
        self._log = log or logging.getLogger("mochi_xdit").info

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
            self._stop_pool_locked()
            self._released_because = reason
            self._log(f"Mochi xDiT: pool stopped ({reason}); the next prompt loads it again")
            return True

    def shutdown(self) -> None:
        """Stop the pool, then disconnect from Ray (stopping it if we started it)."""
        with self._lock:
            self._stop_pool_locked()
            self._disconnect_locked()

    def shutdown_at_exit(self) -> None:
        """`shutdown` for atexit: never waits forever on a request still in flight in another thread."""
        if self._lock.acquire(timeout=EXIT_LOCK_WAIT_S):
            try:
                self._stop_pool_locked()
                self._disconnect_locked()
            finally:
                self._lock.release()
        elif self._ray is not None:  # a thread holds the lock (mid-request): stop Ray under it anyway
            self._ray.close()

    # -- under the lock ------------------------------------------------------------------------

    def _acquire(self, spec: PoolSpec, announce_reuse: bool) -> Pool:
        key = spec.reuse_key()
        with self._lock:
            if self.current is not None and self._key == key:
                if announce_reuse:
                    self._log(f"Mochi xDiT: reusing the live pool ({_layout(spec)})")
                return self._pool
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
            if target is not None:  # the cluster's totals: the pool about to be replaced does not count
                check_capacity(spec.parallel, RankResources.for_device(spec.device, spec.cpu_threads))
            self._stop_pool_locked()
            self._log(f"Mochi xDiT: starting {_layout(spec)}; {reason}")
            self._pool = Pool(spec, self._ray)
            self._key = key
            self._released_because = None
            seconds = self._pool.startup_seconds
            self._log(f"Mochi xDiT: {spec.world_size} rank(s) up in {seconds['ranks']:.1f} s, weights loaded in "
                      f"{seconds['load']:.1f} s")
            return self._pool

    def _connect_locked(self, target: str | None, reason: str) -> RayConnection:
        if self._ray is not None and self._ray.address == target:
            return self._ray
        if target is not None:
            probe_address(target)  # a dead address fails here, before the pool or Ray is touched
        if self._ray is not None:
            self._log(f"Mochi xDiT: leaving {self._ray} ({reason})")
        self._stop_pool_locked()
        self._disconnect_locked()
        started = time.perf_counter()
        self._ray = RayConnection.connect(target)
        where = "a private Ray on 127.0.0.1" if self._ray.private else f"the Ray cluster at {target}"
        self._log(f"Mochi xDiT: connected to {where} in {time.perf_counter() - started:.1f} s")
        return self._ray

    def _stop_pool_locked(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._pool = None

    def _disconnect_locked(self) -> None:
        if self._ray is not None:
            self._ray.close()
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
