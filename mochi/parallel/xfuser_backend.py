"""xfuser (xDiT) as an optional attention backend on CUDA machines (the `gpu` extra).

Our own USP layer (`usp.py`) is the default everywhere. xfuser cannot be imported without a GPU,
keeps its process groups in yunchang's module-level singleton, and attends to padded keys (it has
no way to drop them), so this backend refuses token counts not divisible by the sequence degree.
Written against xfuser's `xFuserLongContextAttention` source (0.4 - 0.7); it has not been run here
(no GPU), which is why it is opt-in and CI never needs it.
"""

import importlib.util

import torch

ATTENTION_BACKENDS = ("usp", "xfuser")
_GPU_EXTRA = "pip install 'comfyui-mochi-xdit[gpu]'"


def check_attention_backend(name: str, device: torch.device) -> None:
    """Raise a ValueError naming the fix unless `name` can run on `device` (called before any group forms)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r}; use one of {', '.join(ATTENTION_BACKENDS)} ('usp' runs everywhere)")
    if name != "xfuser":
        return
    if device.type != "cuda":
        raise ValueError(
            f"attention_backend='xfuser' runs on CUDA GPUs only, but the device is {device.type!r}; "
            "use attention_backend='usp' (the built-in Ulysses/Ring layer, same results)"
        )
    if importlib.util.find_spec("xfuser") is None or importlib.util.find_spec("yunchang") is None:
        raise ValueError(
            f"attention_backend='xfuser' needs the xfuser and yunchang packages ({_GPU_EXTRA}); "
            "or use attention_backend='usp'"
        )


class XFuserAttention:
    """One xFuserLongContextAttention bound to a ParallelContext's Ulysses and Ring groups."""

    def __init__(self, ctx):
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.globals import PROCESS_GROUP

        # yunchang reads its groups from a module singleton when the layer is built; hand it ours.
        PROCESS_GROUP.ULYSSES_PG = ctx.ulysses_group
        PROCESS_GROUP.RING_PG = ctx.ring_group
        self.layer = xFuserLongContextAttention(ring_impl_type="basic")

    def __call__(self, video_q, video_k, video_v, text_q, text_k, text_v, ctx, video_len, need_text):
        """Same contract as `usp_joint_attention`; needs video_len == S_l * SP (no padding)."""
        B, S_l, H, Dh = video_q.shape
        if S_l * ctx.sp_degree != video_len:
            raise ValueError(
                f"attention_backend='xfuser' cannot drop padding: {video_len} video tokens are not divisible by "
                f"the {ctx.sp_degree} sequence ranks; use attention_backend='usp' or a size whose token count is"
            )
        joint = {}
        if text_q.shape[1]:
            joint = dict(joint_tensor_query=text_q, joint_tensor_key=text_k, joint_tensor_value=text_v,
                         joint_strategy="rear")
        out = self.layer(None, video_q, video_k, video_v, **joint)  # [B, S_l + L, H, Dh]
        return out[:, :S_l], (out[:, S_l:] if need_text else None)
