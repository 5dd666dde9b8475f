"""The one attention kernel every Mochi attention call goes through.

`attention_with_lse` returns the softmax log-sum-exp beside the output, because Ring attention
merges partial results block by block (online softmax) and needs it. Backends:
flash-attn on CUDA for bf16/fp16, PyTorch's CPU flash kernel on CPU, and explicit math otherwise.
"""

import math

import torch

try:  # GPU extra; never needed on CPU.
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (non-causal) attention that also returns the log-sum-exp of the scores.

    Args:
        q: [B, H, Sq, Dh] queries.
        k: [B, H, Sk, Dh] keys (Sk may be 0: the output is then zero and lse is -inf).
        v: [B, H, Sk, Dh] values.
        scale: score scale, default 1 / sqrt(Dh).

    Returns:
        out: [B, H, Sq, Dh] in q's dtype.
        lse: [B, H, Sq] float32, log(sum_k exp(scale * q.k)).
    """
    B, H, Sq, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    if k.shape[2] == 0:
        return q.new_zeros(B, H, Sq, Dh), q.new_full((B, H, Sq), float("-inf"), dtype=torch.float32)
    if q.is_cuda and _flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn wants [B, S, H, Dh]
        out, lse, _ = _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
            return_attn_probs=True,
        )
        return out.transpose(1, 2), lse.float()  # [B, H, Sq, Dh], [B, H, Sq]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale
        )[:2]
        return out, lse.float()
    return _math_attention_with_lse(q, k, v, scale)


def _math_attention_with_lse(q, k, v, scale):
    """Reference math path in fp32 (any device, any dtype)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # [B, H, Sq, Sk]
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.float())  # [B, H, Sq, Dh]
    return out.to(q.dtype), lse


def merge_attention_partials(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets (online softmax).

    out = (exp(lse_a) * out_a + exp(lse_b) * out_b) / (exp(lse_a) + exp(lse_b)), written stably
    with a sigmoid (derivation: ring-flash-attention's `_update_out_and_lse`). Runs in fp32.

    Args:
        out, lse: running result [B, H, S, Dh] fp32 and [B, H, S] fp32, or None for the first block.
        block_out, block_lse: the new block's result, same shapes (any float dtype for block_out).

    Returns:
        The merged (out, lse), fp32.
    """
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)  # [B, H, S]; -inf + -inf stays -inf
    new_lse_safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    weight_old = torch.exp(lse - new_lse_safe)[..., None]  # [B, H, S, 1]
    weight_new = torch.exp(block_lse - new_lse_safe)[..., None]
    return out * weight_old + block_out * weight_new, new_lse
