"""Will the ranks fit? Checked before anything starts and before a working pool is touched.

A private Ray has this machine's CPUs and GPUs; a cluster has what `ray.cluster_resources()` says.
Ray itself would wait forever for resources that never come, so a pool that cannot be placed is
refused here, with the numbers and what to change.
"""

import os
from dataclasses import dataclass


class CapacityError(ValueError):
    """The ranks asked for do not fit the machine or cluster; the message says what to change."""


@dataclass(frozen=True)
class RankResources:
    """Ray resources one rank asks for: a GPU, or `cpus` CPU threads."""

    cpus: int
    gpus: int

    @classmethod
    def for_device(cls, device: str, cpu_threads: int) -> "RankResources":
        return cls(cpus=cpu_threads, gpus=0) if device == "cpu" else cls(cpus=1, gpus=1)

    def bundle(self) -> dict:
        return {"CPU": self.cpus, "GPU": self.gpus} if self.gpus else {"CPU": self.cpus}


def local_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of this machine: what a private Ray offers."""
    import torch

    return os.cpu_count() or 1, torch.cuda.device_count() if torch.cuda.is_available() else 0


def capacity_problem(world_size: int, per_rank: RankResources, have_cpus: int, have_gpus: int,
                     where: str) -> str | None:
    """None when `world_size` ranks fit `have_cpus` / `have_gpus`, else what to change.

    Args:
        where: "this machine" or "the Ray cluster", for the message.
    """
    if per_rank.gpus and not have_gpus:
        return (f"world_size={world_size} GPU ranks, but {where} has no GPU; use CPU ranks (device cpu)"
                + (" or give the ray_address of a cluster with GPUs" if where == "this machine" else ""))
    if per_rank.gpus and world_size * per_rank.gpus > have_gpus:
        return (f"world_size={world_size} needs {world_size * per_rank.gpus} GPUs (one per rank) but {where} has "
                f"{have_gpus}; use world_size <= {have_gpus // per_rank.gpus}"
                + (" or give the ray_address of a cluster with more GPUs" if where == "this machine"
                   else ", or add GPU nodes (check `ray status`)"))
    need = world_size * per_rank.cpus
    if need > have_cpus:
        threads = f" x {per_rank.cpus} CPU threads" if per_rank.cpus > 1 else ""
        return (f"world_size={world_size}{threads} needs {need} CPUs but {where} has {have_cpus}; use world_size <= "
                f"{max(1, have_cpus // per_rank.cpus)}" + (" or fewer cpu_threads" if per_rank.cpus > 1 else "")
                + (" (CPU ranks are for trying the pack out; GPUs run one rank each)" if not per_rank.gpus else ""))
    return None


def check_local_capacity(world_size: int, device: str, cpu_threads: int) -> None:
    """Raise CapacityError when the ranks do not fit this machine (a private Ray)."""
    cpus, gpus = local_resources()
    problem = capacity_problem(world_size, RankResources.for_device(device, cpu_threads), cpus, gpus,
                               "this machine")
    if problem:
        raise CapacityError(problem)
