"""genmo -> diffusers key conversion for Mochi DiT weights (bench helper; imports no mochi_xdit).

diffusers splits the fused projections (qkv_x -> to_q/to_k/to_v, qkv_y -> add_*_proj), renames
the modules, and orders two fused pairs the other way round: the SwiGLU input projection
(genmo silu(first) * second, diffusers first * silu(second)) and the final layer's
(shift, scale) modulation. Those two get their halves swapped.
"""

import torch

_RENAMED = {
    "x_embedder.proj": "patch_embed.proj",
    "t_embedder.mlp.0": "time_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_embed.timestep_embedder.linear_2",
    "t5_y_embedder.to_kv": "time_embed.pooler.to_kv",
    "t5_y_embedder.to_q": "time_embed.pooler.to_q",
    "t5_y_embedder.to_out": "time_embed.pooler.to_out",
    "t5_yproj": "time_embed.caption_proj",
    "final_layer.linear": "proj_out",
}
_QK_NORMS = {"q_norm_x": "norm_q", "k_norm_x": "norm_k", "q_norm_y": "norm_added_q", "k_norm_y": "norm_added_k"}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def genmo_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {"pos_frequencies": state["pos_frequencies"]}
    for genmo, theirs in _RENAMED.items():
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = state[f"{genmo}.{suffix}"]
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(state[f"final_layer.mod.{suffix}"])
    for i in range(depth):
        g, d = f"blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1
        norm_y = "norm1_context.linear_1" if last else "norm1_context.linear"
        for suffix in ("weight", "bias"):
            out[f"{d}.norm1.linear.{suffix}"] = state[f"{g}.mod_x.{suffix}"]
            out[f"{d}.{norm_y}.{suffix}"] = state[f"{g}.mod_y.{suffix}"]
            out[f"{d}.attn1.to_out.0.{suffix}"] = state[f"{g}.attn.proj_x.{suffix}"]
            if not last:
                out[f"{d}.attn1.to_add_out.{suffix}"] = state[f"{g}.attn.proj_y.{suffix}"]
        q, k, v = state[f"{g}.attn.qkv_x.weight"].chunk(3)
        out.update({f"{d}.attn1.to_q.weight": q, f"{d}.attn1.to_k.weight": k, f"{d}.attn1.to_v.weight": v})
        q, k, v = state[f"{g}.attn.qkv_y.weight"].chunk(3)
        out.update({f"{d}.attn1.add_q_proj.weight": q, f"{d}.attn1.add_k_proj.weight": k,
                    f"{d}.attn1.add_v_proj.weight": v})
        for genmo, theirs in _QK_NORMS.items():
            out[f"{d}.attn1.{theirs}.weight"] = state[f"{g}.attn.{genmo}.weight"]
        out[f"{d}.ff.net.0.proj.weight"] = _swap_halves(state[f"{g}.mlp_x.w1.weight"])
        out[f"{d}.ff.net.2.weight"] = state[f"{g}.mlp_x.w2.weight"]
        if not last:
            out[f"{d}.ff_context.net.0.proj.weight"] = _swap_halves(state[f"{g}.mlp_y.w1.weight"])
            out[f"{d}.ff_context.net.2.weight"] = state[f"{g}.mlp_y.w2.weight"]
    return out
