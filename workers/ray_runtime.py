"""Connecting this process to Ray (a private Ray, or an existing cluster), and making our code
importable inside Ray workers. `MochiService` (service.py) is the only caller: it owns the one
`RayConnection` of the process.

Two modes (DESIGN.md section 5):
- no address (and no RAY_ADDRESS): start a private Ray for this process with
  `ray.init(address="local")` (plain `ray.init()` would silently attach to any cluster recorded
  in /tmp/ray, even a stale one), no dashboard, token auth on, every address on 127.0.0.1;
- an address: probe it first (a dead address fails in seconds, not after Ray's ~14 minutes of
  retries), then join that cluster as it is (its own auth settings apply).

Ray workers import actor classes by module name, so `mochi_xdit` must be importable there. When a
plain `python` cannot import it from this very folder (the pack sits in ComfyUI's custom_nodes
under another name, not pip-installed), the actors get a runtime_env that provides it: a
PYTHONPATH entry holding a `mochi_xdit` symlink to this folder (local Ray), or a staged copy
shipped with `py_modules` (a cluster, whose nodes do not share our disk).
"""

import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import ray

from .protocol import LOOPBACK

PACKAGE_NAME = "mochi_xdit"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set before a private Ray starts (DESIGN.md section 5): token auth on, node addresses on loopback.
PRIVATE_RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# The ranks' CUDA allocator: expandable segments suit long videos (large, varying activations), and
# the ranks must not inherit ComfyUI's own setting (it may run with cudaMallocAsync). torch 2.13 reads
# PYTORCH_ALLOC_CONF before PYTORCH_CUDA_ALLOC_CONF, so an inherited PYTORCH_ALLOC_CONF would win over
# ours: the ranks get both names.
RANK_CUDA_ALLOC_CONF = "expandable_segments:True"
ALLOC_CONF_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
PROBE_TIMEOUT_S = 5.0
RAY_CLIENT_PREFIX = "ray://"
RAY_CLIENT_PORT = 10001
RAY_GCS_PORT = 6379
# Where Ray records the cluster that `address="auto"` means (written by `ray start --head`).
RAY_CURRENT_CLUSTER_FILE = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")
_STAGE_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "*.safetensors", "*.mp4", ".pytest_cache")


class RayAddressError(ValueError):
    """A Ray address that cannot work (bad form, nothing listening, a missing extra); says what to check."""


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: the argument, else RAY_ADDRESS, else None (private Ray)."""
    address = (address or "").strip() or os.environ.get("RAY_ADDRESS", "").strip()
    return address or None


def address_problem(address: str | None) -> str | None:
    """Checks of an address that need no network: its form, and the extra `ray://` needs."""
    address = (address or "").strip()
    if not address or address == "auto":
        return None
    bare = address[len(RAY_CLIENT_PREFIX):] if address.startswith(RAY_CLIENT_PREFIX) else address
    match = _ADDRESS.match(bare)
    if not match or not 0 < int(match["port"]) < 65536:
        return (f"ray_address {address!r} is not a Ray address; leave it empty (a private Ray on this machine), "
                f"or give 'auto', 'host:{RAY_GCS_PORT}' or '{RAY_CLIENT_PREFIX}host:{RAY_CLIENT_PORT}'")
    if address.startswith(RAY_CLIENT_PREFIX) and importlib.util.find_spec("grpc") is None:
        return (f"ray_address {address!r} uses Ray Client, which needs the `ray[client]` extra in this Python: "
                "pip install \"ray[client]>=2.56\" (or give the cluster's GCS address host:6379 instead)")
    return None


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of 'host:port', '[v6]:port' or 'ray://host:port'; 'auto' is looked up as Ray does."""
    if address == "auto":
        try:
            with open(RAY_CURRENT_CLUSTER_FILE) as recorded:
                address = recorded.read().strip()
        except OSError:
            raise RayAddressError(
                "ray_address 'auto': no Ray cluster is running on this machine (no "
                f"{RAY_CURRENT_CLUSTER_FILE}); start one with `ray start --head`, give its address, or leave "
                "ray_address empty for a private Ray") from None
    if address.startswith(RAY_CLIENT_PREFIX):
        address = address[len(RAY_CLIENT_PREFIX):]
    match = _ADDRESS.match(address)
    if not match:
        raise RayAddressError(f"{address!r} is not host:port")
    return match["host"].strip("[]"), int(match["port"])


def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast when nothing listens at a cluster address (Ray itself retries for ~14 minutes)."""
    problem = address_problem(address)
    if problem:
        raise RayAddressError(problem)
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        # refused: the host answered at once, nothing listens on the port; else no answer in time
        answer = "refused the connection" if isinstance(error, ConnectionRefusedError) else \
            f"gave no answer within {timeout_s:g} s"
        raise RayAddressError(
            f"nothing answers at ray_address {address!r}: {host}:{port} {answer} ({error.strerror or error}). "
            "Check that `ray start --head` runs there and listens on that port (GCS "
            f"{RAY_GCS_PORT}, Ray Client {RAY_CLIENT_PORT}), that no firewall blocks it, and that this machine "
            "has the cluster's token (RAY_AUTH_TOKEN) if token auth is on. The current pool was left as it was."
        ) from None


AUTH_MODE_VAR, AUTH_TOKEN_VAR, AUTH_TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = os.path.join("~", ".ray", "auth_token")
LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def token_source() -> str:
    """Where Ray's token loader (2.60, C++ `AuthenticationTokenLoader`) finds this process's token,
    in its order: RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if os.environ.get(AUTH_TOKEN_VAR, "").strip():
        return f"{AUTH_TOKEN_VAR} (environment)"
    path = os.environ.get(AUTH_TOKEN_PATH_VAR, "").strip()
    if path:
        return (f"the file {AUTH_TOKEN_PATH_VAR}={path}" if os.path.isfile(path)
                else f"{AUTH_TOKEN_PATH_VAR}={path}, which is not a readable file")
    default = os.path.expanduser(DEFAULT_TOKEN_FILE)
    return f"the file {default}" if os.path.isfile(default) else "nowhere (no token set)"


def _is_loopback_host(address: str) -> bool:
    try:
        host, _ = _host_port(address)
    except RayAddressError:
        return False
    return host in ("localhost", "::1") or host.startswith("127.")


def connect_failure(address: str | None, error: BaseException | None, timeout_s: float) -> str:
    """What to tell the user when `ray.init` failed (`error`) or ran past `timeout_s` (error None):
    what happened, and each thing to check, with this process's own settings."""
    what = (f"did not finish within {timeout_s:g} s" if error is None
            else f"failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''})")
    if address is None:
        return (f"starting a private Ray on this machine {what}. The machine may be overloaded, or /tmp full; "
                "Ray's logs are under /tmp/ray/session_latest/logs. The current pool was stopped.")
    mode = os.environ.get(AUTH_MODE_VAR)
    checks = [
        f"the token: a cluster started with {AUTH_MODE_VAR}=token (Ray's default for every cluster from 2.61) accepts "
        f"only drivers with {AUTH_MODE_VAR}=token and the same token; this process has {AUTH_MODE_VAR}="
        f"{mode if mode is not None else '(unset)'} and its token comes from {token_source()} (Ray reads "
        f"{AUTH_TOKEN_VAR}, else the file named by {AUTH_TOKEN_PATH_VAR}, else {DEFAULT_TOKEN_FILE}; a wrong one "
        "shows as InvalidAuthToken in Ray's log)",
    ]
    if _is_loopback_host(address) and os.environ.get(LOOPBACK_VAR) != "0":
        checks.append(
            f"the address: Ray replaces 127.0.0.1 by this machine's external address unless {LOOPBACK_VAR}=0 is set "
            "before Ray is imported; for a cluster started on 127.0.0.1 (`ray start --head --node-ip-address "
            f"127.0.0.1`) set {LOOPBACK_VAR}=0 here too, else give the address `ray start` printed")
    checks.append(f"that the cluster runs the same Ray version as this process ({ray.__version__}) and that "
                  "`ray status` works on the head node")
    return (f"joining the Ray cluster at {address!r} {what}. Check " + "; ".join(
        f"({i}) {check}" for i, check in enumerate(checks, 1)) + ". The current pool was stopped.")


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


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _copy_stage() -> str:
    """A fresh copy of this folder named `mochi_xdit` (sources only), for `py_modules` uploads. One
    folder per process: several processes joining clusters at once must not copy over each other.
    Folders left by processes that ended inside `ray.init` (a join past its deadline) are removed."""
    stage = f"{_stage_dir('copy')}_{os.getpid()}"
    for old in glob.glob(f"{_stage_dir('copy')}_*"):
        pid = old.rsplit("_", 1)[-1]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    target = os.path.join(stage, PACKAGE_NAME)
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(PACK_ROOT, target, ignore=_STAGE_IGNORE)
    return target


def actor_runtime_env(private: bool, importable: bool) -> dict:
    """Per-actor runtime_env: normal CPU priority (Ray runs workers at nice 15 by default, which
    starves the ranks on a busy machine), the ranks' own CUDA allocator (`RANK_CUDA_ALLOC_CONF`, under
    both names torch reads), and
    on a private Ray a PYTHONPATH entry that provides `mochi_xdit` when workers cannot import it already."""
    env_vars = {"RAY_worker_niceness": "0"}
    env_vars.update({name: RANK_CUDA_ALLOC_CONF for name in ALLOC_CONF_NAMES})
    if private and not importable:
        python_path = [_symlink_stage()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env_vars["PYTHONPATH"] = os.pathsep.join(python_path)
    return {"env_vars": env_vars}


def job_runtime_env(importable: bool) -> dict | None:
    """Job-level runtime_env when joining a cluster: ship a staged copy with `py_modules` (Ray only
    uploads local directories at the job level, i.e. in `ray.init`)."""
    return None if importable else {"py_modules": [_copy_stage()]}


def apply_to_imported_ray(loopback_only: bool) -> bool | None:
    """Make an already imported Ray see the private-Ray settings; returns the previous loopback flag.

    Why private modules: Ray reads RAY_* variables once, when it is imported, which in ComfyUI
    happens before us (other packs import Ray). `ray._raylet.Config.initialize("")` re-reads them
    (token auth); `ray._private.ray_constants.ENABLE_RAY_CLUSTER` mirrors
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (without it the driver resolves 127.0.0.1 to the external
    address). What breaks on a Ray upgrade that moves them: each lookup is guarded, so the private Ray
    still starts, but token auth or loopback-only addressing may silently not apply; the test
    `test_private_ray_stays_on_loopback_with_token_auth` catches that.
    """
    try:
        from ray._raylet import Config

        Config.initialize("")
    except ImportError:  # older Rays: no token auth
        pass
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        return None
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = not loopback_only
    return previous


@contextmanager
def _quieter(logger_name: str, level: int):
    """Raise one logger's level for the duration of a block."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


class RayConnection:
    """This process's connection to Ray; made by `connect`, ended by `close`.

    Attributes:
        address: the cluster address joined, or None for our private local Ray.
        private: True when we started Ray (and stop it on close).
        actor_env: runtime_env for every actor (priority, allocator, imports).
        owned: we called ray.init (close disconnects); False for a connection the user's own code
            made before us, which close leaves alone.
    """

    def __init__(self, address: str | None, private: bool, actor_env: dict,
                 saved_env: dict[str, str | None], saved_cluster_flag: bool | None, owned: bool = True):
        self.address, self.private, self.actor_env, self.owned = address, private, actor_env, owned
        self._saved_env, self._saved_cluster_flag = saved_env, saved_cluster_flag

    @classmethod
    def connect(cls, address: str | None) -> "RayConnection":
        """Start a private Ray (address None) or join a cluster (probed first)."""
        if ray.is_initialized():
            # The user's own code connected this process: use that connection as it is.
            if not package_importable_here():
                raise RuntimeError(
                    "Ray was already initialised by other code in this process, and Ray workers cannot import "
                    f"{PACKAGE_NAME!r} from {PACK_ROOT}; install the pack on every node (pip install -e <pack>) "
                    "or let the pack connect to Ray itself (do not call ray.init first)"
                )
            return cls(address or "existing", False, actor_runtime_env(False, True), {}, None, owned=False)
        if address is not None:
            probe_address(address)
            importable = package_importable_here()
            job_env = job_runtime_env(importable)
            staged = list((job_env or {}).get("py_modules", []))  # ray.init replaces them by upload URIs
            try:
                ray.init(address=address, runtime_env=job_env, logging_level="WARNING", log_to_driver=False)
            finally:  # ray.init has uploaded the staged copy (or failed): the local one is not needed again
                for folder in staged:
                    shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
            return cls(address, False, actor_runtime_env(False, importable), {}, None)
        importable = package_importable_here()
        saved_env = {key: os.environ.get(key) for key in PRIVATE_RAY_ENV}
        os.environ.update(PRIVATE_RAY_ENV)
        connection = cls(None, True, actor_runtime_env(True, importable), saved_env,
                         apply_to_imported_ray(loopback_only=True))
        try:
            # _node_ip_address: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, which
            # may have happened before us; naming the loopback address keeps every Ray address on it.
            # log_to_driver off: the ranks' prints stay in Ray's logs; the driver says what happens.
            # Ray's driver module is held at ERROR while it starts: `ray.init` runs on the service's
            # own thread (service.py), and Ray warns on every start that it sets no SIGTERM handler
            # off the main thread. Nothing is lost: its processes still end with ours (their
            # parent-death signal), and a private Ray's settings are all ours.
            with _quieter("ray._private.worker", logging.ERROR):
                ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count() or 1,
                         _node_ip_address=LOOPBACK, logging_level="WARNING", log_to_driver=False)
        except BaseException:
            connection.close()
            raise
        return connection

    def close(self) -> None:
        """Disconnect (stopping Ray if we started it) and restore what `connect` changed; a connection
        the user's own code made stays up."""
        if self.owned and ray.is_initialized():
            ray.shutdown()
        if self._saved_env:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = {}
            apply_to_imported_ray(loopback_only=self._saved_cluster_flag is False)

    def __repr__(self) -> str:
        return "RayConnection(private, 127.0.0.1)" if self.private else f"RayConnection({self.address})"
