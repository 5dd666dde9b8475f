"""Where ranks run: one Ray placement group per Ulysses group, each packed onto one node.

Ulysses does an all-to-all per attention layer, so its ranks want the fastest links (one node);
ring and CFG traffic is light enough to cross nodes (DESIGN.md section 4). Ranks of a Ulysses
group are adjacent (rank = cfg_rank * SP + ring_rank * U + ulysses_rank), so group g holds ranks
g*U .. g*U + U - 1 and bundle j of its placement group is rank g*U + j.
"""

import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..mochi.parallel.config import ParallelConfig
from .capacity import CapacityError, RankResources, capacity_problem


def check_capacity(parallel: ParallelConfig, per_rank: RankResources) -> None:
    """Refuse a pool the connected Ray cluster cannot hold (Ray would wait forever); counts the
    cluster's total resources, so a pool about to be replaced does not count against its successor."""
    total = ray.cluster_resources()
    problem = capacity_problem(parallel.world_size, per_rank, int(total.get("CPU", 0)), int(total.get("GPU", 0)),
                               "the Ray cluster")
    if problem:
        raise CapacityError(problem)


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
