"""What crosses the driver/actor boundary: the pool's spec, per-verb deadlines, the rendezvous,
step reports (failures live in `failures.py`).

Everything here is a frozen dataclass validated once (STYLE "Config"), so an actor trusts what it
receives. Only small things travel: paths (never weights), requests, latents, tiles.
"""

import os
from dataclasses import dataclass, field

import torch

from ..mochi.constants import WEIGHT_DTYPE_NAMES as WEIGHT_DTYPES
from ..mochi.dit import DiTCompile
from ..mochi.parallel.config import ParallelConfig
from ..mochi.parallel.kernel import AttentionBackend
from ..mochi.weight_placement import WeightPlacement
from .model_files import identify, model_file_problem

LOOPBACK = "127.0.0.1"
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds for each verb (driver side) and for every collective (rank side).

    A dead rank is noticed at once (Ray reports the actor's death); these bound a rank that hangs.
    """

    start_s: float = 120.0  # actors scheduled and started, process group formed
    load_s: float = 900.0  # weights read from disk (the 10B DiT is ~20 GB)
    step_s: float = 300.0  # one denoising step on every rank
    call_s: float = 60.0  # begin / finish / cancel
    decode_s: float = 900.0  # one rank's share of the VAE tiles
    collective_s: float = 60.0  # torch.distributed collective timeout inside the ranks

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"timeout {name}={value!r} must be a positive number of seconds")


@dataclass(frozen=True)
class PoolSpec:
    """Everything that defines a pool; two equal specs can share one pool (see `reuse_key`).

    Args:
        dit_path: DiT safetensors file; each rank memory-maps it itself.
        vae_path: VAE (decoder) safetensors file, or None when this pool never decodes.
        weight_dtype: "bf16", "fp16", "fp32" or "fp8" for the DiT (the VAE runs fp32 on CPU, bf16 on GPU).
        parallel: degrees; world_size actors are started.
        device: "cpu" (gloo, `cpu_threads` threads per rank) or "cuda" (NCCL, one GPU per rank).
        cpu_threads: torch threads (and Ray CPUs) per rank on CPU; ignored on CUDA.
        ray_address: None to start a private Ray on 127.0.0.1, or a cluster address to join.
        timeouts: per-verb deadlines.
        attention_backend: the `mochi.parallel.kernel.AttentionBackend` the ranks use (a value name is
            accepted and converted); each rank refuses at start one it cannot run.
        compile: the `mochi.dit.DiTCompile` the ranks build their DiT with (ON: the blocks' regions
            between collectives run through torch.compile; a value name is accepted).
        weights: where each rank keeps the DiT's block weights, a `mochi.weight_placement.WeightPlacement`
            (a value name is accepted and converted; `auto` is resolved before, in `options.py`).
    """

    dit_path: str
    vae_path: str | None
    weight_dtype: str
    parallel: ParallelConfig
    device: str = "cpu"
    cpu_threads: int = 1
    ray_address: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    attention_backend: AttentionBackend = AttentionBackend.AUTO
    compile: DiTCompile = DiTCompile.OFF
    weights: WeightPlacement = WeightPlacement.REPLICATED

    def __post_init__(self):
        object.__setattr__(self, "attention_backend", AttentionBackend.parse(self.attention_backend))
        object.__setattr__(self, "compile", DiTCompile.parse(self.compile))
        object.__setattr__(self, "weights", WeightPlacement.parse(self.weights))
        for name in ("dit_path", "vae_path"):
            path = getattr(self, name)
            if path is None and name == "vae_path":
                continue
            if not isinstance(path, str):
                raise ValueError(f"{name}={path!r} is not a file; give the path of a .safetensors file")
            problem = model_file_problem(path, name.removesuffix("_path"))
            if problem:
                raise ValueError(problem)
            object.__setattr__(self, name, os.path.abspath(path))
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype={self.weight_dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}; use 'cpu' or 'cuda'")
        if not isinstance(self.cpu_threads, int) or self.cpu_threads < 1:
            raise ValueError(f"cpu_threads={self.cpu_threads!r} must be a positive integer")
        if not isinstance(self.parallel, ParallelConfig):
            raise TypeError("parallel must be a ParallelConfig (see mochi_xdit.mochi.parallel.config.auto)")
        if self.weights is WeightPlacement.SHARDED and self.parallel.world_size < 2:
            raise ValueError("weights='sharded' needs two or more ranks (each keeps 1/N of every block); "
                             "use 'offload' (or 'replicated') on one rank")

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def reuse_key(self) -> tuple:
        """Pools are reused while this is unchanged: the same files with the same content
        (`model_files.FileIdentity`: inode, size, times, header hash), dtype, degrees, device,
        threads, cluster, timeouts, attention backend, compile option and weight placement.

        Raises:
            ModelFileError: a file was deleted or cannot be read now (one line, with the fix).
        """
        files = tuple(identify(path, role, "now") for role, path in (("dit", self.dit_path), ("vae", self.vae_path))
                      if path is not None)
        return (files, self.weight_dtype, self.parallel, self.device, self.cpu_threads, self.ray_address,
                self.timeouts, self.attention_backend, self.compile, self.weights)


@dataclass(frozen=True)
class FileRendezvous:
    """How the ranks of a private pool (all on this machine) meet: a torch FileStore in a folder
    only this user can open. No port is opened, so nothing listens beyond loopback. The ranks also
    mirror their collective counts there (`collective_ledger`), which the driver reads when ranks
    die together."""

    path: str

    def collective_ledger(self, rank: int) -> str:
        """The file where `rank` mirrors its `CollectiveLedger`, beside the store."""
        from ..mochi.parallel.collective import ledger_path

        return ledger_path(os.path.dirname(self.path), rank)


@dataclass(frozen=True)
class TcpRendezvous:
    """How the ranks of a cluster pool meet: rank 0's TCPStore. torch binds it on every interface
    (other nodes must reach it), which is why the README asks cluster users for a private network."""

    host: str
    port: int


@dataclass(frozen=True)
class RankInfo:
    """Where a rank runs (for placement checks, logs and tests)."""

    rank: int
    node_id: str
    node_ip: str
    pid: int
    package_dir: str  # where `mochi_xdit` was imported from inside the actor
    niceness: int  # CPU priority of the rank's process (0: normal)


@dataclass(frozen=True)
class StepReport:
    """What the driver learns after each lockstep step.

    Args:
        index: the step just done (0-based).
        total: number of steps in the run.
        seconds: the slowest rank's compute time for this step.
        preview: rank 0's small preview latent (model space, [B, 12, 1, H, W] the middle latent frame)
            when asked for, else None.
    """

    index: int
    total: int
    seconds: float
    preview: torch.Tensor | None = None


@dataclass(frozen=True)
class RunResult:
    """What one sampling run returns.

    Args:
        latent: the VAE-space latent [B, 12, T, H, W] fp32.
        cache_stats: the step cache's `mochi.step_cache.CacheStats` (computed / skipped steps), or
            None when the run had no cache.
        notes: rank 0's one-time lines from this run (the attention kernel it measured at its first
            forward of a shape), for the driver's log: Ray does not forward the ranks' output.
    """

    latent: torch.Tensor
    cache_stats: object = None
    notes: tuple[str, ...] = ()
