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

CAPACITY_RECHECK_S = 1.0  # while placing, how often the live nodes are counted again


def live_capacity_problem(parallel: ParallelConfig, per_rank: RankResources) -> str | None:
    """None when the cluster's live nodes can hold the pool (each Ulysses group on one node), else
    what is missing. Counts the nodes' total resources, alive ones only: a pool about to be replaced
    does not count against its successor, and a lost node does not count at all (Ray would wait
    for it; the next request used to wait the whole start deadline and raise a bare TimeoutError)."""
    nodes = ray.nodes()
    live = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    lost = len(nodes) - len(live)
    cpus = int(sum(node.get("CPU", 0) for node in live))
    gpus = int(sum(node.get("GPU", 0) for node in live))
    where = f"the Ray cluster ({len(live)} live node(s){f', {lost} lost' if lost else ''})"
    problem = capacity_problem(parallel.world_size, per_rank, cpus, gpus, where)
    if problem:
        return problem
    U = parallel.ulysses_degree
    groups = parallel.world_size // U
    group = RankResources(per_rank.cpus * U, per_rank.gpus * U)
    fit = sum(min(int(node.get("CPU", 0)) // group.cpus if group.cpus else groups,
                  int(node.get("GPU", 0)) // group.gpus if group.gpus else groups) for node in live)
    if fit < groups:
        need = f"{group.cpus} CPUs" + (f" and {group.gpus} GPUs" if group.gpus else "")
        return (f"the pool needs {groups} node slot(s) of {need} each (a Ulysses group of {U} ranks stays on one node), "
                f"but {where} offers {fit}; lower ulysses_degree (put the factor on ring), or add nodes "
                "(check `ray status`)")
    return None


def check_capacity(parallel: ParallelConfig, per_rank: RankResources) -> None:
    """Refuse at once a pool the connected cluster's live nodes cannot hold (Ray would wait forever)."""
    problem = live_capacity_problem(parallel, per_rank)
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
        self.parallel, self.per_rank = parallel, per_rank
        self.groups = [
            placement_group([per_rank.bundle() for _ in range(U)], strategy="STRICT_PACK", name=f"{name}-ulysses{g}")
            for g in range(parallel.world_size // U)
        ]

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every group is placed, or raise naming what could not be placed."""
        deadline = time.monotonic() + timeout_s
        for g, group in enumerate(self.groups):
            ready, placed = [], group.ready()
            while not ready and time.monotonic() < deadline:
                remaining = max(0.0, deadline - time.monotonic())
                ready, _ = ray.wait([placed], timeout=min(remaining, CAPACITY_RECHECK_S))
                problem = None if ready else live_capacity_problem(self.parallel, self.per_rank)
                if problem:  # a node was lost while we waited: it will not come back by itself
                    self.remove()
                    raise CapacityError(problem)
            if not ready:
                self.remove()
                raise CapacityError(
                    f"Ulysses group {g} ({self.ulysses_degree} ranks on one node) could not be placed within "
                    f"{timeout_s:.0f} s: no node has {self.ulysses_degree} free rank slots; lower ulysses_degree "
                    "(put the factor on ring), free resources (other jobs may hold them), or add nodes (check `ray status`)"
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
