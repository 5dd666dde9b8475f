"""Unified sequence parallelism (Ulysses x Ring) for Mochi's joint attention.

Video tokens are sharded contiguously over the SP = U * R sequence ranks (padded to a multiple of
SP); text tokens are replicated and packed. Ulysses first turns [S/SP, H] shards into ring blocks
[S/R, H/U]; text q/k/v are sliced by head locally (never sent). The ring then passes video K/V
blocks; padded keys are dropped before the kernel and the text K/V join once, so the result equals
single-device attention. Text queries see every video block as it passes, so the ring needs no text
gather; only the Ulysses head slices of the text output are all-gathered (L x D/U per rank, small).
"""

import torch

from .ring import RingComm, ring_attention
from .ulysses import gather_heads, heads_to_sequence, sequence_to_heads


def usp_joint_attention(
    video_q: torch.Tensor,
    video_k: torch.Tensor,
    video_v: torch.Tensor,
    text_q: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    ctx,
    video_len: int,
    need_text: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint attention over all ranks' video tokens and the (replicated) text tokens.

    Args:
        video_q, video_k, video_v: [B, S_l, H, Dh] this rank's padded shard (S_l = ceil(S / SP)).
        text_q, text_k, text_v: [B, L, H, Dh] valid text tokens, the same on every rank (L may be 0).
        ctx: ParallelContext.
        video_len: global number of real video tokens S.
        need_text: False skips the text output (the last block does not use it).

    Returns:
        video_out [B, S_l, H, Dh] (zeros at padded positions), text_out [B, L, H, Dh] or None.
    """
    if video_len is None:
        raise ValueError("usp_joint_attention needs video_len (the global number of real video tokens)")
    if ctx.xfuser_attention is not None:  # optional GPU backend, see xfuser_backend.py
        return ctx.xfuser_attention(video_q, video_k, video_v, text_q, text_k, text_v, ctx, video_len, need_text)
    B, S_l, H, Dh = video_q.shape
    U, R = ctx.ulysses_degree, ctx.ring_degree
    if H % U:
        raise ValueError(
            f"ulysses={U} does not divide this model's {H} heads; build the ParallelConfig with "
            f"num_heads={H} so it is checked up front, and put the factor on ring"
        )
    if S_l * ctx.sp_degree < video_len:
        raise ValueError(
            f"video shard of {S_l} tokens x {ctx.sp_degree} ranks cannot hold {video_len} tokens; shard the "
            "sequence with ctx.shard_sequence"
        )
    if U > 1:
        qkv = sequence_to_heads(video_q, video_k, video_v, ctx.ulysses_group, U, ctx.sent_bytes)  # [3, B, H/U, S_blk, Dh]
        heads = slice(ctx.ulysses_rank * (H // U), (ctx.ulysses_rank + 1) * (H // U))
        text_q, text_k, text_v = text_q[:, :, heads], text_k[:, :, heads], text_v[:, :, heads]  # [B, L, H/U, Dh]
    else:
        qkv = video_q.new_empty(3, B, H, S_l, Dh)
        for i, x in enumerate((video_q, video_k, video_v)):
            qkv[i] = x.transpose(1, 2)  # [B, H, S_l, Dh]: the kernel's layout, one copy
    S_blk = qkv.shape[3]  # U * S_l tokens: ring block j covers [j * S_blk, (j + 1) * S_blk)

    def valid_keys(ring_rank: int) -> int:
        return max(0, min(video_len - ring_rank * S_blk, S_blk))

    n_q = valid_keys(ctx.ring_rank)
    q = qkv[0, :, :, :n_q]  # [B, h, n_q, Dh], padded queries dropped too
    if need_text:
        q = torch.cat([q, text_q.transpose(1, 2)], dim=2)  # [B, h, n_q + L, Dh]
    kv = qkv[1:]  # [2, B, h, S_blk, Dh], contiguous
    comm = RingComm(ctx.ring_group, ctx.ring_ranks, ctx.ring_rank, ctx.sent_bytes) if R > 1 else None
    out = ring_attention(
        q, kv, text_k.transpose(1, 2), text_v.transpose(1, 2), valid_keys, comm, ctx.ring_rank, R
    )  # [B, h, n_q (+ L), Dh]

    text_out = out[:, :, n_q:].transpose(1, 2) if need_text else None  # [B, L, h, Dh]
    if U > 1:
        video_out = heads_to_sequence(out[:, :, :n_q], S_blk, ctx.ulysses_group, U, ctx.sent_bytes)  # [B, S_l, H, Dh]
        if need_text:
            text_out = gather_heads(text_out, ctx.ulysses_group, U, ctx.sent_bytes)  # [B, L, H, Dh]
    else:
        video_out = out.new_zeros(B, S_blk, H, Dh)
        video_out[:, :n_q] = out[:, :, :n_q].transpose(1, 2)  # [B, S_l, H, Dh], zeros where padded
    return video_out, text_out
