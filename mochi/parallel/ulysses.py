"""Ulysses all-to-alls: trade a sequence shard with all heads for the whole (ring-local) sequence
with a slice of the heads, and back.

With U ranks, rank u holds tokens [u*S_l, (u+1)*S_l) of its ring block for all H heads; after
`sequence_to_heads` it holds all U*S_l tokens for heads [u*H/U, (u+1)*H/U). Every rank sends
(U-1)/U of its input each way.
"""

from collections import Counter

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group, sent: Counter | None, kind: str) -> torch.Tensor:
    """all_to_all_single along dim 0 (chunk j goes to group rank j, chunk j of the result came from j)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    if sent is not None:
        world = x.shape[0]
        sent[kind] += (world - 1) * (x.numel() // world) * x.element_size()
    return out


def sequence_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, degree: int,
                      sent: Counter | None = None) -> torch.Tensor:
    """Scatter heads, gather sequence, for q, k and v in one all-to-all; the result comes out in the
    attention kernel's layout (heads before sequence), so no further copy is needed.

    Args:
        q, k, v: [B, S_l, H, Dh] this rank's sequence shard, all heads.
        group: the Ulysses process group (degree U ranks, ordered by ulysses_rank).
        degree: U.
        sent: optional byte counter (key "ulysses").

    Returns:
        [3, B, H/U, U*S_l, Dh]: q, k, v of all U shards in rank order, this rank's head slice.
    """
    B, S_l, H, Dh = q.shape
    U, h = degree, H // degree
    send = q.new_empty(U, 3, B, S_l, h, Dh)
    for i, x in enumerate((q, k, v)):
        send[:, i] = x.view(B, S_l, U, h, Dh).permute(2, 0, 1, 3, 4)  # [U(dest), B, S_l, H/U, Dh]
    received = _all_to_all(send, group, sent, "ulysses")  # [U(src), 3, B, S_l, H/U, Dh]
    return received.permute(1, 2, 4, 0, 3, 5).reshape(3, B, h, U * S_l, Dh)  # [3, B, H/U, U*S_l, Dh]


def heads_to_sequence(out: torch.Tensor, length: int, group, degree: int, sent: Counter | None = None) -> torch.Tensor:
    """The inverse, from the kernel's layout: scatter sequence, gather heads.

    Args:
        out: [B, H/U, n, Dh] attention output for the first n <= U*S_l tokens of the ring block
            (the rest is padding and comes back as zeros).
        length: U*S_l, the ring block's padded length.
        group, degree, sent: as in `sequence_to_heads`.

    Returns:
        [B, S_l, H, Dh]: this rank's sequence shard, all heads.
    """
    B, h, n, Dh = out.shape
    U = degree
    S_l = length // U
    send = out.new_empty(U, B, S_l, h, Dh)
    for u in range(U):  # shard u of the block goes to Ulysses rank u
        valid = max(0, min(n - u * S_l, S_l))
        send[u, :, :valid] = out[:, :, u * S_l : u * S_l + valid].transpose(1, 2)  # [B, valid, H/U, Dh]
        send[u, :, valid:] = 0
    received = _all_to_all(send, group, sent, "ulysses")  # [U(src = head slice), B, S_l, H/U, Dh]
    return received.permute(1, 2, 0, 3, 4).reshape(B, S_l, U * h, Dh)  # [B, S_l, H, Dh]


def gather_heads(x: torch.Tensor, group, degree: int, sent: Counter | None = None) -> torch.Tensor:
    """All-gather a head slice over the Ulysses group (the small text output, L x D/U per rank).

    Args:
        x: [B, L, H/U, Dh] this rank's heads.

    Returns:
        [B, L, H, Dh] all heads, in rank order.
    """
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(degree)]
    dist.all_gather(parts, x, group=group)
    if sent is not None:
        sent["text_gather"] += (degree - 1) * x.numel() * x.element_size()
    return torch.cat(parts, dim=2)  # [B, L, H, Dh]
