"""Where ranks run: one Ray placement group per Ulysses group, each packed onto one node.

Ulysses does an all-to-all per attention layer, so its ranks want the fastest links (one node);
ring and CFG traffic is light enough to cross nodes (DESIGN.md section 4). Ranks of a Ulysses
group are adjacent (rank = cfg_rank * SP + ring_rank * U + ulysses_rank), so group g holds ranks
g*U .. g*U + U - 1 and bundle j of its placement group is rank g*U + j.
"""

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..mochi.parallel.config import ParallelConfig


@dataclass(frozen=True)
class RankResources:
    """Ray resources one rank asks for: a GPU, or `cpus` CPU threads."""

    cpus: int
    gpus: int

    def bundle(self) -> dict:
        return {"CPU": self.cpus, "GPU": self.gpus} if self.gpus else {"CPU": self.cpus}


def check_capacity(parallel: ParallelConfig, per_rank: RankResources) -> None:
    """Refuse a pool the cluster cannot hold, before anything starts (Ray would wait forever)."""
    total = ray.cluster_resources()
    need_cpu = parallel.world_size * per_rank.cpus
    have_cpu, have_gpu = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    if per_rank.gpus and parallel.world_size * per_rank.gpus > have_gpu:
        raise ValueError(
            f"{parallel.world_size} ranks need {parallel.world_size * per_rank.gpus} GPUs but the Ray cluster has "
            f"{have_gpu}; lower world_size, or add GPU nodes (check `ray status`)"
        )
    if need_cpu > have_cpu:
        raise ValueError(
            f"{parallel.world_size} ranks x {per_rank.cpus} CPU threads need {need_cpu} CPUs but the Ray cluster "
            f"has {have_cpu}; lower world_size or cpu_threads (check `ray status`)"
        )


class RankPlacement:
    """Placement groups for a pool; `strategy(rank)` goes into the actor's options.

    Args:
        parallel: the degrees (Ulysses groups are packed per node).
        per_rank: resources of one rank.
        name: prefix for the placement groups' names (shown by `ray list placement-groups`).
    """

    def __init__(self, parallel: ParallelConfig, per_rank: RankResources, name: str):
        U = parallel.ulysses_degree
        self.ulysses_degree = U
        self.groups = [
            placement_group([per_rank.bundle() for _ in range(U)], strategy="STRICT_PACK", name=f"{name}-ulysses{g}")
            for g in range(parallel.world_size // U)
        ]

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every group is placed, or raise naming what could not be placed."""
        deadline = time.monotonic() + timeout_s
        for g, group in enumerate(self.groups):
            remaining = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([group.ready()], timeout=remaining)
            if not ready:
                self.remove()
                raise TimeoutError(
                    f"Ulysses group {g} ({self.ulysses_degree} ranks on one node) could not be placed within "
                    f"{timeout_s:.0f} s: no node has {self.ulysses_degree} free rank slots; lower ulysses_degree "
                    "(put the factor on ring), free resources, or add nodes (check `ray status`)"
                )

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        group, index = divmod(rank, self.ulysses_degree)
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group], placement_group_bundle_index=index,
            placement_group_capture_child_tasks=False,
        )

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []
