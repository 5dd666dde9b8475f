"""Mochi's joint attention: video queries and valid text queries attend to all video keys and
all valid text keys. One device here; under a ParallelContext the sequence-parallel version in
`parallel/usp.py` runs instead, with the same inputs and outputs."""

import torch

from .parallel.kernel import AttentionBackend, attention
from .parallel.kernel_choice import KernelChoice


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
    kernels: KernelChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over the concatenation [video, text].

    Args:
        video_q, video_k, video_v: [B, Sx, H, Dh] (the local, padded shard under ctx).
        text_q, text_k, text_v: [B, L, H, Dh] valid text tokens, replicated (L may be 0).
        ctx: ParallelContext or None.
        video_len: global number of real video tokens; required under ctx to drop padding.
        need_text: False skips the text output (the last block does not use it).
        kernels: the kernel choice (`parallel.kernel_choice.KernelChoice`); None: the guess for
            auto (the context's backend under ctx).

    Returns:
        video_out [B, Sx, H, Dh] and text_out [B, L, H, Dh] (None when need_text is False).
    """
    if ctx is not None:
        from .parallel.usp import usp_joint_attention

        return usp_joint_attention(
            video_q, video_k, video_v, text_q, text_k, text_v, ctx=ctx, video_len=video_len, need_text=need_text,
            kernels=kernels,
        )
    if need_text and text_q.shape[1]:
        q = torch.cat([video_q, text_q], dim=1)  # [B, Sx+L, H, Dh]
    else:
        q = video_q  # a view serves: no text queries
    if text_k.shape[1]:
        k, v = torch.cat([video_k, text_k], dim=1), torch.cat([video_v, text_v], dim=1)  # [B, Sx+L, H, Dh]
    else:
        k, v = video_k, video_v
    return joined_attention(q, k, v, video_q.shape[1], need_text, kernels)


def joined_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_tokens: int, need_text: bool = True,
    kernels: KernelChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One device's joint attention on the already joined sequence [video, text].

    Args:
        q: [B, Sx(+L), H, Dh] (the text queries only when need_text); k, v: [B, Sx+L, H, Dh].
        video_tokens: Sx.
        need_text: whether q holds the text queries and the text output is wanted.
        kernels: the kernel choice; None: the guess for auto.

    Returns:
        video_out [B, Sx, H, Dh] and text_out [B, L, H, Dh] (None when need_text is False), views of
        one output.
    """
    kernels = KernelChoice() if kernels is None else kernels
    if kernels.backend is AttentionBackend.XFUSER:
        raise ValueError("attention_backend=xfuser is xDiT's multi-rank attention layer and needs two or more ranks "
                         "(a ParallelContext); use attention_backend=auto on one device")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, Dh]: the kernels take this layout
    out = attention(q, k, v, kernel=kernels.kernel(q, k, v, need_lse=False))
    out = out.transpose(1, 2)  # [B, Sx(+L), H, Dh]
    return out[:, :video_tokens], (out[:, video_tokens:] if need_text else None)
