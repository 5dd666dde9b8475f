"""xfuser (xDiT) as an optional attention backend on CUDA machines (the `gpu` extra).

Selected with `AttentionBackend.XFUSER` (loader `attention_backend=xfuser`, CLI `--attention xfuser`);
`kernel.backend_problem` refuses it, with the install line, where it cannot run. Our own USP
layer (`usp.py`) is the default everywhere. xfuser cannot be imported without a GPU,
keeps its process groups in yunchang's module-level singleton, and attends to padded keys (it has
no way to drop them), so this backend refuses token counts not divisible by the sequence degree.
Written against xfuser's `xFuserLongContextAttention` source (0.4 - 0.7); it has not been run here
(no GPU), which is why it is opt-in and CI never needs it.
"""


class XFuserAttention:
    """One xFuserLongContextAttention bound to a ParallelContext's Ulysses and Ring groups."""

    def __init__(self, ctx):
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.globals import PROCESS_GROUP

        # yunchang reads its groups from a module singleton when the layer is built; hand it ours. They
        # are real groups even of size one (ParallelContext makes them for this backend): to yunchang
        # None means the whole world.
        PROCESS_GROUP.ULYSSES_PG = ctx.ulysses_group
        PROCESS_GROUP.RING_PG = ctx.ring_group
        self.layer = xFuserLongContextAttention(ring_impl_type="basic")

    def __call__(self, video_q, video_k, video_v, text_q, text_k, text_v, ctx, video_len, need_text):
        """Same contract as `usp_joint_attention`; needs video_len == S_l * SP (no padding)."""
        B, S_l, H, Dh = video_q.shape
        if S_l * ctx.sp_degree != video_len:
            raise ValueError(
                f"attention_backend=xfuser cannot drop padding: {video_len} video tokens are not divisible by "
                f"the {ctx.sp_degree} sequence ranks; use attention_backend=auto (our USP layer drops padding) "
                "or a size whose token count is"
            )
        joint = {}
        if text_q.shape[1]:
            joint = dict(joint_tensor_query=text_q, joint_tensor_key=text_k, joint_tensor_value=text_v,
                         joint_strategy="rear")
        out = self.layer(None, video_q, video_k, video_v, **joint)  # [B, S_l + L, H, Dh]
        return out[:, :S_l], (out[:, S_l:] if need_text else None)
