"""Starting or joining Ray, and making our code importable inside Ray workers.

Two modes (DESIGN.md section 5):
- no address (and no RAY_ADDRESS): start a private Ray for this process with
  `ray.init(address="local")` (plain `ray.init()` would silently attach to any cluster recorded
  in /tmp/ray, even a stale one), no dashboard, token auth on, every address on 127.0.0.1;
- an address: join that cluster as it is (its own auth settings apply).

Ray workers import actor classes by module name, so `mochi_xdit` must be importable there. When a
plain `python` cannot import it from this very folder (the pack sits in ComfyUI's custom_nodes
under another name, not pip-installed), the actors get a runtime_env that provides it: a
PYTHONPATH entry holding a `mochi_xdit` symlink to this folder (local Ray), or a staged copy
shipped with `py_modules` (a cluster, whose nodes do not share our disk).
"""

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import ray

from .protocol import LOOPBACK

PACKAGE_NAME = "mochi_xdit"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set before a private Ray starts (DESIGN.md section 5): token auth on, node addresses on loopback.
PRIVATE_RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_STAGE_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "*.safetensors", "*.mp4", ".pytest_cache")


@dataclass(frozen=True)
class RayRuntime:
    """The Ray this process is connected to.

    Args:
        address: the cluster address joined, or None for our private local Ray.
        private: True when this module started Ray (and must stop it).
        actor_env: runtime_env for every actor (priority, imports).
    """

    address: str | None
    private: bool
    actor_env: dict


_lock = threading.Lock()
_runtime: RayRuntime | None = None
_saved_env: dict[str, str | None] = {}
_shutdown_hooks: list = []  # callables run before Ray stops (the pool cache registers its cleanup)


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: the argument, else RAY_ADDRESS, else None (private Ray)."""
    address = (address or "").strip() or os.environ.get("RAY_ADDRESS", "").strip()
    return address or None


def package_importable_here() -> bool:
    """Whether a fresh `python` (as Ray starts its workers) imports `mochi_xdit` from this folder."""
    probe = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.find_spec({PACKAGE_NAME!r})\n"
        "origin = spec and spec.submodule_search_locations and list(spec.submodule_search_locations)\n"
        "print(os.path.realpath(origin[0]) if origin else '')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                               env=env, cwd=tempfile.gettempdir()).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return found == os.path.realpath(PACK_ROOT)


def _stage_dir(kind: str) -> str:
    digest = hashlib.sha1(os.path.realpath(PACK_ROOT).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mochi_xdit_stage_{kind}_{os.getuid()}_{digest}")


def _symlink_stage() -> str:
    """A directory whose `mochi_xdit` entry is a symlink to this folder (PYTHONPATH for local workers)."""
    stage = _stage_dir("link")
    link = os.path.join(stage, PACKAGE_NAME)
    os.makedirs(stage, exist_ok=True)
    if not (os.path.islink(link) and os.path.realpath(link) == os.path.realpath(PACK_ROOT)):
        tmp_link = f"{link}.{os.getpid()}"
        os.symlink(os.path.realpath(PACK_ROOT), tmp_link)
        os.replace(tmp_link, link)
    return stage


def _copy_stage() -> str:
    """A fresh copy of this folder named `mochi_xdit` (sources only), for `py_modules` uploads."""
    stage = _stage_dir("copy")
    target = os.path.join(stage, PACKAGE_NAME)
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(PACK_ROOT, target, ignore=_STAGE_IGNORE)
    return target


def actor_runtime_env(private: bool, importable: bool) -> dict:
    """Per-actor runtime_env: normal CPU priority (Ray runs workers at nice 15 by default, which
    starves the ranks on a busy machine), CUDA's caching allocator with expandable segments (the
    ranks must not inherit ComfyUI's `cudaMallocAsync`; growing video activations fragment less),
    and on a private Ray a PYTHONPATH entry that provides `mochi_xdit` when workers cannot import it
    already."""
    env_vars = {"RAY_worker_niceness": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if private and not importable:
        python_path = [_symlink_stage()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env_vars["PYTHONPATH"] = os.pathsep.join(python_path)
    return {"env_vars": env_vars}


def job_runtime_env(importable: bool) -> dict | None:
    """Job-level runtime_env when joining a cluster: ship a staged copy with `py_modules` (Ray only
    uploads local directories at the job level, i.e. in `ray.init`)."""
    return None if importable else {"py_modules": [_copy_stage()]}


def ensure_ray(address: str | None = None) -> RayRuntime:
    """Connect this process to Ray (start a private one or join a cluster) and return the runtime.

    Reuses the current connection when it matches; a different address shuts the old one down
    first (after the registered hooks stopped every pool on it).
    """
    global _runtime
    wanted = resolve_address(address)
    with _lock:
        if _runtime is not None and ray.is_initialized():
            if _runtime.address == wanted:
                return _runtime
            _shutdown_locked()
        elif ray.is_initialized():
            # The user's own code connected this process: use that connection as it is.
            if not package_importable_here():
                raise RuntimeError(
                    "Ray was already initialised by other code in this process, and Ray workers cannot import "
                    f"{PACKAGE_NAME!r} from {PACK_ROOT}; install the pack on every node (pip install -e <pack>) "
                    "or let the pack connect to Ray itself (do not call ray.init first)"
                )
            _runtime = RayRuntime(address=wanted or "existing", private=False, actor_env=actor_runtime_env(False, True))
            return _runtime
        importable = package_importable_here()
        if wanted is None:
            for key, value in PRIVATE_RAY_ENV.items():
                _saved_env.setdefault(key, os.environ.get(key))
                os.environ[key] = value
            _reload_ray_config()
            _set_loopback_only(True)
            # _node_ip_address: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, which
            # may have happened before us; naming the loopback address keeps every Ray address on it.
            try:
                ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count() or 1,
                         _node_ip_address=LOOPBACK, logging_level="WARNING", log_to_driver=True)
            except BaseException:
                _shutdown_locked()  # restores the environment
                raise
            _runtime = RayRuntime(address=None, private=True, actor_env=actor_runtime_env(True, importable))
        else:
            ray.init(address=wanted, runtime_env=job_runtime_env(importable), logging_level="WARNING",
                     log_to_driver=True)
            _runtime = RayRuntime(address=wanted, private=False, actor_env=actor_runtime_env(False, importable))
        return _runtime


def _reload_ray_config() -> None:
    """Make an already imported Ray re-read RAY_* variables (it caches them at import; Ray does the
    same when it turns token auth on by itself). Older Rays without this have no token auth."""
    try:
        from ray._raylet import Config
    except ImportError:
        return
    Config.initialize("")


_saved_cluster_flag: list = []


def _set_loopback_only(on: bool) -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into `ray_constants.ENABLE_RAY_CLUSTER` when it is
    imported, which may have happened before we set the variable (ComfyUI imports many packs); the
    driver then still resolves 127.0.0.1 to the external address. Mirror the variable into the
    constant while our private Ray lives (the Ray processes we start read the variable itself)."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        return
    if on:
        _saved_cluster_flag.append(ray_constants.ENABLE_RAY_CLUSTER)
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif _saved_cluster_flag:
        ray_constants.ENABLE_RAY_CLUSTER = _saved_cluster_flag.pop()


def add_shutdown_hook(hook) -> None:
    """Run `hook()` before Ray is shut down by `shutdown_ray` or at process exit."""
    if hook not in _shutdown_hooks:
        _shutdown_hooks.append(hook)


def _shutdown_locked() -> None:
    global _runtime
    errors = []
    for hook in list(_shutdown_hooks):
        try:
            hook()
        except Exception as error:  # keep stopping the rest; reported below
            errors.append(error)
    if ray.is_initialized():
        ray.shutdown()
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _saved_env:
        _saved_env.clear()
        _reload_ray_config()
        _set_loopback_only(False)
    _runtime = None
    if errors:
        raise RuntimeError(f"stopping the pools before Ray shut down failed: {errors[0]!r}") from errors[0]


def shutdown_ray() -> None:
    """Stop every pool, then disconnect from Ray (stopping it if we started it)."""
    with _lock:
        if _runtime is not None or ray.is_initialized():
            _shutdown_locked()


def current_runtime() -> RayRuntime | None:
    return _runtime if ray.is_initialized() else None


atexit.register(shutdown_ray)
