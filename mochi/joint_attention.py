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
    kernels = KernelChoice() if kernels is None else kernels
    if kernels.backend is AttentionBackend.XFUSER:
        raise ValueError("attention_backend=xfuser is xDiT's multi-rank attention layer and needs two or more ranks "
                         "(a ParallelContext); use attention_backend=auto on one device")
    Sx = video_q.shape[1]
    q = _joined(video_q, text_q if need_text else None)  # [B, H, Sx(+L), Dh]
    k = _joined(video_k, text_k)  # [B, H, Sx+L, Dh]
    v = _joined(video_v, text_v)
    out = attention(q, k, v, kernel=kernels.kernel(q, k, v, need_lse=False))
    out = out.transpose(1, 2)  # [B, Sx(+L), H, Dh]
    return out[:, :Sx], (out[:, Sx:] if need_text else None)


def _joined(video: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """[video, text] along the sequence in the kernel's layout: [B, Sx, H, Dh] (+ [B, L, H, Dh]) ->
    [B, H, Sx(+L), Dh]. A view of the video tensor when there is no text (the last block's
    queries, an empty prompt): the kernels take any layout whose last dim is contiguous."""
    if text is None or text.shape[1] == 0:
        return video.transpose(1, 2)
    return torch.cat([video, text], dim=1).transpose(1, 2)
