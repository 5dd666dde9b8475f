"""Mochi's joint attention: video queries and valid text queries attend to all video keys and
all valid text keys. One device here; under a ParallelContext the sequence-parallel version in
`parallel/usp.py` runs instead, with the same inputs and outputs."""

import torch

from .parallel.kernel import AttentionBackend, AttentionConfig, attention


def joint_attention(
    video_q: torch.Tensor,
    video_k: torch.Tensor,
    video_v: torch.Tensor,
    text_q: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    ctx=None,
    video_len: int | None = None,
    need_text: bool = True,
    attention_config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over the concatenation [video, text].

    Args:
        video_q, video_k, video_v: [B, Sx, H, Dh] (the local, padded shard under ctx).
        text_q, text_k, text_v: [B, L, H, Dh] valid text tokens, replicated (L may be 0).
        ctx: ParallelContext or None.
        video_len: global number of real video tokens; required under ctx to drop padding.
        need_text: False skips the text output (the last block does not use it).
        attention_config: kernel choice; None: the context's under ctx, else auto.

    Returns:
        video_out [B, Sx, H, Dh] and text_out [B, L, H, Dh] (None when need_text is False).
    """
    if ctx is not None:
        from .parallel.usp import usp_joint_attention

        return usp_joint_attention(
            video_q, video_k, video_v, text_q, text_k, text_v, ctx=ctx, video_len=video_len, need_text=need_text,
            attention=attention_config,
        )
    attention_config = AttentionConfig() if attention_config is None else attention_config
    if attention_config.backend is AttentionBackend.XFUSER:
        raise ValueError("attention_backend=xfuser is xDiT's multi-rank attention layer and needs two or more ranks "
                         "(a ParallelContext); use attention_backend=auto on one device")
    Sx = video_q.shape[1]
    q = torch.cat([video_q, text_q] if need_text else [video_q], dim=1).transpose(1, 2)  # [B, H, Sx(+L), Dh]
    k = torch.cat([video_k, text_k], dim=1).transpose(1, 2)  # [B, H, Sx+L, Dh]
    v = torch.cat([video_v, text_v], dim=1).transpose(1, 2)
    out = attention(q, k, v, kernel=attention_config.kernel(q, need_lse=False))
    out = out.transpose(1, 2)  # [B, Sx(+L), H, Dh]
    return out[:, :Sx], (out[:, Sx:] if need_text else None)
