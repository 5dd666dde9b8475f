"""Process groups for one parallel layout, held in a `ParallelContext` that is passed into the model.

Rank layout (xDiT / yunchang): rank = cfg_rank * SP + ring_rank * U + ulysses_rank, SP = U * R.
Adjacent ranks form a Ulysses group (the all-to-all wants the fastest links); the two CFG halves are
the farthest apart (they exchange one latent per step). Nothing here is a module global, so one
process can hold several layouts over the same default group (the tests do).
"""

from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from .collective import CollectiveLedger, collective
from .config import ParallelConfig
from .kernel import AttentionBackend, AttentionConfig, backend_problem
from .xfuser_backend import XFuserAttention


class ParallelContext:
    """Degrees, ranks and process groups of one layout, plus the sequence and CFG helpers.

    Args:
        config: a validated ParallelConfig; its world_size must equal the default group's.
        device: where tensors live; the backend follows it (NCCL on CUDA, gloo on CPU).
        timeout: collective timeout for the new groups (None: the default group's).
        attention: how attention picks its kernel (`kernel.AttentionConfig`; default auto). Its
            backend `xfuser` swaps our USP layer for xDiT's (CUDA, the gpu extra); a backend that
            cannot run on `device` is refused here, before any group forms.
        collectives: counts this rank's collectives (a pool rank passes one mirrored to a file the
            driver reads when ranks die together); None keeps an in-process one.

    Every rank of the default group must construct the same layouts in the same order (group
    creation is collective). Groups of size one are not created (group None): their degree is 1
    and no collective of ours runs on them. With the xfuser backend they are: yunchang reads a None
    group as the whole world (`dist.get_world_size(None)`), which would mix the CFG branches and
    span every rank in its all-to-all.
    """

    def __init__(
        self,
        config: ParallelConfig,
        device: torch.device | str = "cpu",
        timeout: timedelta | None = None,
        attention: AttentionConfig = AttentionConfig(),
        collectives: CollectiveLedger | None = None,
    ):
        if not isinstance(attention, AttentionConfig):
            raise TypeError(f"attention must be a kernel.AttentionConfig, got {type(attention)}")
        problem = backend_problem(attention.backend, attention.device_type or torch.device(device).type,
                                  attention.installed, config.world_size)
        if problem is not None:
            raise ValueError(problem)
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelContext needs an initialised default process group; call "
                "torch.distributed.init_process_group first (or pass ctx=None for one device)"
            )
        world = dist.get_world_size()
        if config.world_size != world:
            raise ValueError(
                f"ParallelConfig is for {config.world_size} ranks but the process group has {world}; "
                f"build the config with world_size={world}"
            )
        self.config = config
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.rank = dist.get_rank()
        self.world_size = world
        self.cfg_degree = config.cfg_degree
        self.ulysses_degree = config.ulysses_degree
        self.ring_degree = config.ring_degree
        self.sp_degree = config.sp_degree
        U, R, SP = self.ulysses_degree, self.ring_degree, self.sp_degree
        self.cfg_rank, self.sp_rank = divmod(self.rank, SP)
        self.ring_rank, self.ulysses_rank = divmod(self.sp_rank, U)
        # Bytes this rank sent, by kind; the comm helpers add to it (bench/comm_bytes.py reads it).
        self.sent_bytes: Counter = Counter()
        self.collectives = CollectiveLedger() if collectives is None else collectives

        def rank_of(c: int, r: int, u: int) -> int:
            return c * SP + r * U + u

        ulysses = [[rank_of(c, r, u) for u in range(U)] for c in range(self.cfg_degree) for r in range(R)]
        ring = [[rank_of(c, r, u) for r in range(R)] for c in range(self.cfg_degree) for u in range(U)]
        sp = [[rank_of(c, r, u) for r in range(R) for u in range(U)] for c in range(self.cfg_degree)]
        cfg = [[rank_of(c, r, u) for c in range(self.cfg_degree)] for r in range(R) for u in range(U)]
        self._groups = []
        xfuser = attention.backend is AttentionBackend.XFUSER
        self.ulysses_group, self.ulysses_ranks = self._new_groups(ulysses, timeout, keep_single=xfuser)
        self.ring_group, self.ring_ranks = self._new_groups(ring, timeout, keep_single=xfuser)
        self.sp_group, self.sp_ranks = self._new_groups(sp, timeout)
        self.cfg_group, self.cfg_ranks = self._new_groups(cfg, timeout)
        self.attention = attention.resolved()  # installed kernels detected once, not per forward
        self.xfuser_attention = XFuserAttention(self) if attention.backend is AttentionBackend.XFUSER else None

    def _new_groups(self, rank_lists: list[list[int]], timeout, keep_single: bool = False):
        """Create every group of one kind (collective on all ranks); return this rank's group and its
        global ranks in group order. Size-one groups are skipped (group None) unless `keep_single`."""
        mine, my_ranks = None, None
        for ranks in rank_lists:
            group = None
            if len(ranks) > 1 or keep_single:
                group = dist.new_group(ranks, timeout=timeout, backend=self.backend)
                self._groups.append(group)
            if self.rank in ranks:
                mine, my_ranks = group, ranks
        return mine, my_ranks

    def __repr__(self) -> str:
        return (
            f"ParallelContext(rank={self.rank}/{self.world_size}, cfg={self.cfg_degree}[{self.cfg_rank}], "
            f"ulysses={self.ulysses_degree}[{self.ulysses_rank}], ring={self.ring_degree}[{self.ring_rank}], "
            f"backend={self.backend}, attention={self.attention.backend.value})"
        )

    @property
    def attention_backend(self) -> AttentionBackend:
        """The requested attention backend (`attention.backend`)."""
        return self.attention.backend

    def shard_length(self, length: int) -> int:
        """Tokens per sequence rank for a global length: ceil(length / SP) (the last ranks pad)."""
        return -(-length // self.sp_degree)

    def shard_sequence(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous shard of a sequence, zero-padded so every rank holds
        ceil(S / SP) tokens: [.., S, ..] -> [.., ceil(S/SP), ..] along `dim`."""
        S = t.shape[dim]
        S_local = self.shard_length(S)
        start = self.sp_rank * S_local
        valid = max(0, min(S - start, S_local))
        shard = t.narrow(dim, min(start, S), valid)  # [.., valid, ..]
        if valid < S_local:
            pad_shape = list(t.shape)
            pad_shape[dim] = S_local - valid
            shard = torch.cat([shard, t.new_zeros(pad_shape)], dim=dim)  # [.., S_local, ..]
            return shard
        # A copy, not a view: a view (even a contiguous one) would keep the whole sequence alive.
        return shard.clone(memory_format=torch.contiguous_format)

    def gather_sequence(self, t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        """All-gather the shards over the sequence group and drop the padding:
        [.., S_local, ..] -> [.., length, ..] along `dim` (the same on every sequence rank)."""
        if self.sp_degree > 1:
            t = t.contiguous()
            parts = [torch.empty_like(t) for _ in range(self.sp_degree)]
            with collective("sequence all_gather", self.collectives):
                dist.all_gather(parts, t, group=self.sp_group)
            self.sent_bytes["sequence_gather"] += (self.sp_degree - 1) * t.numel() * t.element_size()
            t = torch.cat(parts, dim=dim)  # [.., SP * S_local, ..]
        return t.narrow(dim, 0, length)

    def gather_cfg(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exchange the two CFG branches' predictions (one all-gather per step).

        Args:
            pred: this rank's prediction: conditional on cfg_rank 0, unconditional on cfg_rank 1.

        Returns:
            (cond, uncond), identical on both CFG ranks.
        """
        if self.cfg_degree != 2:
            raise RuntimeError(f"gather_cfg needs cfg_degree 2, this layout has {self.cfg_degree}; "
                               "run both branches locally when cfg_degree is 1")
        pred = pred.contiguous()
        parts = [torch.empty_like(pred) for _ in range(2)]
        with collective("CFG all_gather", self.collectives):
            dist.all_gather(parts, pred, group=self.cfg_group)
        self.sent_bytes["cfg_gather"] += pred.numel() * pred.element_size()
        return parts[0], parts[1]

    def close(self) -> None:
        """Destroy this layout's groups (the default group stays)."""
        for group in self._groups:
            dist.destroy_process_group(group)
        self._groups = []
        self.collectives.close()
