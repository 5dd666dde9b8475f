"""Ring attention: K/V blocks travel around the ring while each rank attends to the block it holds;
partial results merge by log-sum-exp (online softmax), so the result is exact.

The loop shows the overlap: post the exchange of the current block, compute on it, wait, swap.
"""

from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

from .collective import CollectiveLedger, collective
from .kernel import AttentionConfig, attention, attention_with_lse, merge_attention_partials


class RingComm:
    """One K/V exchange at a time with the ring neighbours, in order: `send_recv` -> `commit` ->
    `wait`. Calling a verb out of order raises instead of deadlocking a collective.

    Args:
        group: the ring process group.
        ranks: the ring's global ranks in ring order.
        index: this rank's position in `ranks`.
        sent: optional byte counter (key "ring").
        ledger: optional count of this rank's collectives (`collective.CollectiveLedger`).
    """

    def __init__(self, group, ranks: list[int], index: int, sent: Counter | None = None,
                 ledger: CollectiveLedger | None = None):
        self.group = group
        self.ledger = ledger
        self.send_to = ranks[(index + 1) % len(ranks)]
        self.recv_from = ranks[(index - 1) % len(ranks)]
        self.sent = sent
        self._ops: list[dist.P2POp] = []
        self._requests = None

    def send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """Queue sending `tensor` to the next rank and receiving the previous rank's into a new buffer
        (returned; valid after `wait`)."""
        if self._requests is not None:
            raise RuntimeError("RingComm.send_recv() while an exchange is in flight; call wait() first")
        if self._ops:
            raise RuntimeError("RingComm.send_recv() called twice; call commit() and wait() in between")
        tensor = tensor.contiguous()
        buffer = torch.empty_like(tensor)
        self._ops = [
            dist.P2POp(dist.isend, tensor, self.send_to, self.group),
            dist.P2POp(dist.irecv, buffer, self.recv_from, self.group),
        ]
        if self.sent is not None:
            self.sent["ring"] += tensor.numel() * tensor.element_size()
        return buffer

    def commit(self) -> None:
        """Start the queued exchange."""
        if not self._ops:
            raise RuntimeError("RingComm.commit() with nothing queued; call send_recv(tensor) first")
        with collective("ring exchange", self.ledger):
            self._requests = dist.batch_isend_irecv(self._ops)
        self._ops = []

    def wait(self) -> None:
        """Block until the committed exchange has finished."""
        if self._requests is None:
            raise RuntimeError("RingComm.wait() without a committed exchange; call send_recv() and commit() first")
        with collective("ring exchange", self.ledger):
            for request in self._requests:
                request.wait()
        self._requests = None


def ring_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    valid_keys: Callable[[int], int],
    comm: RingComm | None,
    ring_rank: int,
    ring_degree: int,
    attention_config: AttentionConfig = AttentionConfig(),
) -> torch.Tensor:
    """Attention of local queries over every rank's video K/V block plus the text K/V.

    Args:
        q: [B, h, Sq, Dh] this rank's queries (valid video queries, then text queries; Sq may be 0).
        kv: [2, B, h, S_blk, Dh] this rank's video keys and values (padded block).
        text_k, text_v: [B, h, L, Dh] text keys and values (L may be 0); joined exactly once.
        valid_keys: ring rank j -> number of real (unpadded) tokens in block j; padding is dropped.
        comm: the ring's RingComm (None when ring_degree is 1).
        ring_rank, ring_degree: this rank's position and the ring size.
        attention_config: picks the kernel (with the log-sum-exp only when there is a ring to merge).

    Returns:
        [B, h, Sq, Dh] in q's dtype.
    """
    out = lse = None
    kernel = attention_config.kernel(q, need_lse=ring_degree > 1)
    block, owner = kv, ring_rank
    for step in range(ring_degree):
        last = step == ring_degree - 1
        if not last:
            incoming = comm.send_recv(block)  # [2, B, h, S_blk, Dh]
            comm.commit()
        n = valid_keys(owner)
        keys, values = block[0, :, :, :n], block[1, :, :, :n]  # [B, h, n, Dh]
        if step == 0 and text_k.shape[2]:
            keys = torch.cat([keys, text_k], dim=2)  # [B, h, n + L, Dh]
            values = torch.cat([values, text_v], dim=2)
        if q.shape[2] and keys.shape[2]:
            if ring_degree == 1:  # one block: nothing to merge, no log-sum-exp (nor a fp32 copy of the output)
                return attention(q, keys, values, kernel=kernel)  # [B, h, Sq, Dh]
            block_out, block_lse = attention_with_lse(q, keys, values, kernel=kernel)  # [B, h, Sq, Dh], [B, h, Sq]
            out, lse = merge_attention_partials(out, lse, block_out, block_lse)
        if not last:
            comm.wait()
            block, owner = incoming, (owner - 1) % ring_degree
    if out is None:  # no queries, or no key anywhere (cannot happen with video_len >= 1)
        return torch.zeros_like(q)
    return out.to(q.dtype)
