"""Ulysses all-to-alls: trade a sequence shard with all heads for the whole (ring-local) sequence
with a slice of the heads, and back.

With U ranks, rank u holds tokens [u*S_l, (u+1)*S_l) of its ring block for all H heads; after
`sequence_to_heads` it holds all U*S_l tokens for heads [u*H/U, (u+1)*H/U). Every rank sends
(U-1)/U of its input each way.

The exchanges are asynchronous and may cover a chunk of each rank's heads at a time, so attention
on one chunk overlaps the exchange of the next (`Pending.wait()` returns the result).
"""

from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

from .collective import CollectiveLedger, collective


class Pending:
    """An all-to-all in flight; `wait()` blocks until it is done and returns the finished tensor."""

    def __init__(self, work, finish: Callable[[], torch.Tensor], ledger: CollectiveLedger | None = None):
        self._work, self._finish, self._ledger = work, finish, ledger

    def wait(self) -> torch.Tensor:
        if self._work is None:
            raise RuntimeError("Pending.wait() called twice; keep the tensor the first call returned")
        with collective("all_to_all", self._ledger):
            self._work.wait()
        self._work = None
        return self._finish()


def _all_to_all(x: torch.Tensor, group, sent: Counter | None, kind: str, ledger: CollectiveLedger | None = None):
    """Start all_to_all_single along dim 0 (chunk j goes to group rank j; chunk j of the result
    comes from j). Returns (result buffer, work handle)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    with collective("all_to_all", ledger):
        work = dist.all_to_all_single(out, x, group=group, async_op=True)
    if sent is not None:
        world = x.shape[0]
        sent[kind] += (world - 1) * (x.numel() // world) * x.element_size()
    return out, work


def sequence_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, degree: int,
                      chunk: int = 0, chunks: int = 1, sent: Counter | None = None,
                      ledger: CollectiveLedger | None = None) -> Pending:
    """Start scattering heads and gathering the sequence, for q, k and v in one all-to-all. The
    result comes out in the attention kernel's layout (heads before sequence): no further copy.

    Args:
        q, k, v: [B, S_l, H, Dh] this rank's sequence shard, all heads.
        group: the Ulysses process group (degree U ranks, ordered by ulysses_rank).
        degree: U.
        chunk, chunks: exchange only chunk `chunk` of `chunks` equal parts of each rank's H/U heads.
        sent: optional byte counter (key "ulysses").
        ledger: optional count of this rank's collectives.

    Returns:
        Pending of [3, B, hc, U*S_l, Dh], hc = H/U/chunks: q, k, v of all U shards in rank order, for
        this rank's heads [ulysses_rank*H/U + chunk*hc, ... + hc).
    """
    B, S_l, H, Dh = q.shape
    U = degree
    hc = H // U // chunks
    send = q.new_empty(U, 3, B, S_l, hc, Dh)
    for i, x in enumerate((q, k, v)):
        heads = x.view(B, S_l, U, chunks, hc, Dh)[:, :, :, chunk]  # [B, S_l, U, hc, Dh]
        send[:, i] = heads.permute(2, 0, 1, 3, 4)  # [U(dest), B, S_l, hc, Dh]
    received, work = _all_to_all(send, group, sent, "ulysses", ledger)  # [U(src), 3, B, S_l, hc, Dh]
    return Pending(work, lambda: received.permute(1, 2, 4, 0, 3, 5).reshape(3, B, hc, U * S_l, Dh), ledger)


def heads_to_sequence(out: torch.Tensor, length: int, group, degree: int, sent: Counter | None = None,
                      ledger: CollectiveLedger | None = None) -> Pending:
    """Start the inverse, from the kernel's layout: scatter the sequence, gather heads.

    Args:
        out: [B, hc, n, Dh] attention output for the first n <= U*S_l tokens of the ring block
            (the rest is padding and comes back as zeros), for one chunk of this rank's heads.
        length: U*S_l, the ring block's padded length.
        group, degree, sent, ledger: as in `sequence_to_heads`.

    Returns:
        Pending of [U, B, S_l, hc, Dh]: this rank's sequence shard; entry u holds Ulysses rank u's
        heads of the chunk (`join_head_chunks` puts the chunks back in head order).
    """
    B, hc, n, Dh = out.shape
    U = degree
    S_l = length // U
    send = out.new_empty(U, B, S_l, hc, Dh)
    for u in range(U):  # shard u of the block goes to Ulysses rank u
        valid = max(0, min(n - u * S_l, S_l))
        send[u, :, :valid] = out[:, :, u * S_l : u * S_l + valid].transpose(1, 2)  # [B, valid, hc, Dh]
        send[u, :, valid:] = 0
    received, work = _all_to_all(send, group, sent, "ulysses", ledger)  # [U(src), B, S_l, hc, Dh]
    return Pending(work, lambda: received, ledger)


def join_head_chunks(parts: list[torch.Tensor]) -> torch.Tensor:
    """[U, B, S_l, hc, Dh] per chunk (from `heads_to_sequence`) -> [B, S_l, H, Dh], head index
    u * H/U + chunk * hc + j."""
    U, B, S_l, hc, Dh = parts[0].shape
    joined = parts[0].new_empty(B, S_l, U, len(parts), hc, Dh)
    for c, part in enumerate(parts):
        joined[:, :, :, c] = part.permute(1, 2, 0, 3, 4)  # [B, S_l, U, hc, Dh]
    return joined.view(B, S_l, U * len(parts) * hc, Dh)  # [B, S_l, H, Dh]


def gather_heads(x: torch.Tensor, group, degree: int, sent: Counter | None = None,
                 ledger: CollectiveLedger | None = None) -> torch.Tensor:
    """All-gather a head slice over the Ulysses group (the small text output, L x D/U per rank).

    Args:
        x: [B, L, H/U, Dh] this rank's heads.

    Returns:
        [B, L, H, Dh] all heads, in rank order.
    """
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(degree)]
    with collective("all_gather", ledger):
        dist.all_gather(parts, x, group=group)
    if sent is not None:
        sent["text_gather"] += (degree - 1) * x.numel() * x.element_size()
    return torch.cat(parts, dim=2)  # [B, L, H, Dh]
