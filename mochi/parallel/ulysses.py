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


def sequence_to_heads(qkv: torch.Tensor, group, degree: int, sent: Counter | None = None) -> torch.Tensor:
    """Scatter heads, gather sequence, for q, k and v in one all-to-all.

    Args:
        qkv: [3, B, S_l, H, Dh] this rank's sequence shard, all heads.
        group: the Ulysses process group (degree U ranks, ordered by ulysses_rank).
        degree: U.
        sent: optional byte counter (key "ulysses").

    Returns:
        [3, B, U*S_l, H/U, Dh]: all U shards in rank order, this rank's head slice.
    """
    N, B, S_l, H, Dh = qkv.shape
    U = degree
    x = qkv.view(N, B, S_l, U, H // U, Dh).permute(3, 0, 1, 2, 4, 5)  # [U(dest), 3, B, S_l, H/U, Dh]
    x = _all_to_all(x, group, sent, "ulysses")  # [U(src), 3, B, S_l, H/U, Dh]
    return x.permute(1, 2, 0, 3, 4, 5).reshape(N, B, U * S_l, H // U, Dh)  # [3, B, U*S_l, H/U, Dh]


def heads_to_sequence(out: torch.Tensor, group, degree: int, sent: Counter | None = None) -> torch.Tensor:
    """The inverse: scatter sequence, gather heads.

    Args:
        out: [B, U*S_l, H/U, Dh] attention output for the ring block, this rank's head slice.
        group, degree, sent: as in `sequence_to_heads`.

    Returns:
        [B, S_l, H, Dh]: this rank's sequence shard, all heads.
    """
    B, S, h, Dh = out.shape
    U = degree
    S_l = S // U
    x = out.view(B, U, S_l, h, Dh).transpose(0, 1)  # [U(dest), B, S_l, H/U, Dh]
    x = _all_to_all(x, group, sent, "ulysses")  # [U(src = head slice), B, S_l, H/U, Dh]
    return x.permute(1, 2, 0, 3, 4).reshape(B, S_l, U * h, Dh)  # [B, S_l, H, Dh]


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
