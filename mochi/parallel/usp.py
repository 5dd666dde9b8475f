"""Unified sequence parallelism (Ulysses x Ring) for Mochi's joint attention.

Video tokens are sharded contiguously over the SP = U * R sequence ranks (padded to a multiple of
SP); text tokens are replicated and packed. Ulysses first turns [S/SP, H] shards into ring blocks
[S/R, H/U]; text q/k/v are sliced by head locally (never sent). The ring then passes video K/V
blocks; padded keys are dropped before the kernel and the text K/V join once, so the result equals
single-device attention. Text queries see every video block as it passes, so the ring needs no text
gather; only the Ulysses head slices of the text output are all-gathered (L x D/U per rank, small).
"""

import torch

from .kernel import AttentionBackend, AttentionConfig
from .ring import RingComm, ring_attention
from .ulysses import gather_heads, heads_to_sequence, join_head_chunks, sequence_to_heads


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
    attention: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint attention over all ranks' video tokens and the (replicated) text tokens.

    Args:
        video_q, video_k, video_v: [B, S_l, H, Dh] this rank's padded shard (S_l = ceil(S / SP)).
        text_q, text_k, text_v: [B, L, H, Dh] valid text tokens, the same on every rank (L may be 0).
        ctx: ParallelContext.
        video_len: global number of real video tokens S.
        need_text: False skips the text output (the last block does not use it).
        attention: kernel choice; None uses the context's (`ctx.attention`).

    Returns:
        video_out [B, S_l, H, Dh] (zeros at padded positions), text_out [B, L, H, Dh] or None.
    """
    if video_len is None:
        raise ValueError("usp_joint_attention needs video_len (the global number of real video tokens)")
    attention = ctx.attention if attention is None else attention
    if attention.backend is AttentionBackend.XFUSER:  # optional GPU backend, see xfuser_backend.py
        if ctx.xfuser_attention is None:
            raise ValueError("attention_backend=xfuser needs a ParallelContext built with it "
                             "(ParallelContext(..., attention=AttentionConfig(AttentionBackend.XFUSER)))")
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
    h = H // U
    # With Ulysses, each rank's heads go in two chunks when they split evenly: attention on the first
    # overlaps the exchange of the second, and the first result travels back during the second's.
    chunks = 2 if U > 1 and h % 2 == 0 else 1
    hc = h // chunks
    if U > 1:
        incoming = [
            sequence_to_heads(video_q, video_k, video_v, ctx.ulysses_group, U, c, chunks, ctx.sent_bytes,
                              ctx.collectives)
            for c in range(chunks)
        ]  # all posted now; they complete in order
        S_blk = U * S_l  # ring block j covers tokens [j * S_blk, (j + 1) * S_blk)
    else:
        S_blk = S_l

    def valid_keys(ring_rank: int) -> int:
        return max(0, min(video_len - ring_rank * S_blk, S_blk))

    n_q = valid_keys(ctx.ring_rank)
    comm = RingComm(ctx.ring_group, ctx.ring_ranks, ctx.ring_rank, ctx.sent_bytes, ctx.collectives) if R > 1 else None
    outgoing, text_parts = [], []
    for c in range(chunks):
        if U > 1:
            qkv = incoming[c].wait()  # [3, B, hc, S_blk, Dh]
        else:
            qkv = video_q.new_empty(3, B, H, S_l, Dh)
            for i, x in enumerate((video_q, video_k, video_v)):
                qkv[i] = x.transpose(1, 2)  # [B, H, S_l, Dh]: the kernel's layout, one copy
        first = ctx.ulysses_rank * h + c * hc  # this chunk's heads, for the replicated text
        text_k_c = text_k[:, :, first : first + hc].transpose(1, 2)  # [B, hc, L, Dh]
        text_v_c = text_v[:, :, first : first + hc].transpose(1, 2)
        q = qkv[0, :, :, :n_q]  # [B, hc, n_q, Dh], padded queries dropped too
        if need_text:
            q = torch.cat([q, text_q[:, :, first : first + hc].transpose(1, 2)], dim=2)  # [B, hc, n_q + L, Dh]
        out = ring_attention(q, qkv[1:], text_k_c, text_v_c, valid_keys, comm, ctx.ring_rank, R,
                             attention)  # [B, hc, n_q (+L), Dh]
        if need_text:
            text_parts.append(out[:, :, n_q:])  # [B, hc, L, Dh]
        if U > 1:
            outgoing.append(heads_to_sequence(out[:, :, :n_q], S_blk, ctx.ulysses_group, U, ctx.sent_bytes,
                                              ctx.collectives))
        else:
            video_out = out.new_zeros(B, S_blk, H, Dh)
            video_out[:, :n_q] = out[:, :, :n_q].transpose(1, 2)  # [B, S_l, H, Dh], zeros where padded

    text_out = torch.cat(text_parts, dim=1).transpose(1, 2) if need_text else None  # [B, L, h, Dh]
    if U > 1:
        video_out = join_head_chunks([pending.wait() for pending in outgoing])  # [B, S_l, H, Dh]
        if need_text:
            text_out = gather_heads(text_out, ctx.ulysses_group, U, ctx.sent_bytes, ctx.collectives)  # [B, L, H, Dh]
    return video_out, text_out
