"""Our DiT against diffusers' MochiTransformer3DModel with the same random weights."""

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT

import diffusers  # the test oracle (pip install .[test])


def genmo_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Key conversion genmo -> diffusers (test-only), including the two half swaps:
    SwiGLU (genmo silu(first)*second, diffusers first*silu(second)) and the final (shift, scale)."""

    def swap_halves(t):
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)

    out = {
        "patch_embed.proj.weight": state["x_embedder.proj.weight"],
        "patch_embed.proj.bias": state["x_embedder.proj.bias"],
        "pos_frequencies": state["pos_frequencies"],
        "norm_out.linear.weight": swap_halves(state["final_layer.mod.weight"]),
        "norm_out.linear.bias": swap_halves(state["final_layer.mod.bias"]),
        "proj_out.weight": state["final_layer.linear.weight"],
        "proj_out.bias": state["final_layer.linear.bias"],
    }
    for genmo, ours in [
        ("t_embedder.mlp.0", "time_embed.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "time_embed.timestep_embedder.linear_2"),
        ("t5_y_embedder.to_kv", "time_embed.pooler.to_kv"),
        ("t5_y_embedder.to_q", "time_embed.pooler.to_q"),
        ("t5_y_embedder.to_out", "time_embed.pooler.to_out"),
        ("t5_yproj", "time_embed.caption_proj"),
    ]:
        out[f"{ours}.weight"] = state[f"{genmo}.weight"]
        out[f"{ours}.bias"] = state[f"{genmo}.bias"]
    for i in range(depth):
        g, d = f"blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1
        out[f"{d}.norm1.linear.weight"] = state[f"{g}.mod_x.weight"]
        out[f"{d}.norm1.linear.bias"] = state[f"{g}.mod_x.bias"]
        ctx_norm = "norm1_context.linear_1" if last else "norm1_context.linear"
        out[f"{d}.{ctx_norm}.weight"] = state[f"{g}.mod_y.weight"]
        out[f"{d}.{ctx_norm}.bias"] = state[f"{g}.mod_y.bias"]
        for name, w in zip(["to_q", "to_k", "to_v"], state[f"{g}.attn.qkv_x.weight"].chunk(3)):
            out[f"{d}.attn1.{name}.weight"] = w
        for name, w in zip(["add_q_proj", "add_k_proj", "add_v_proj"], state[f"{g}.attn.qkv_y.weight"].chunk(3)):
            out[f"{d}.attn1.{name}.weight"] = w
        for genmo_norm, diff_norm in [("q_norm_x", "norm_q"), ("k_norm_x", "norm_k"),
                                      ("q_norm_y", "norm_added_q"), ("k_norm_y", "norm_added_k")]:
            out[f"{d}.attn1.{diff_norm}.weight"] = state[f"{g}.attn.{genmo_norm}.weight"]
        out[f"{d}.attn1.to_out.0.weight"] = state[f"{g}.attn.proj_x.weight"]
        out[f"{d}.attn1.to_out.0.bias"] = state[f"{g}.attn.proj_x.bias"]
        out[f"{d}.ff.net.0.proj.weight"] = swap_halves(state[f"{g}.mlp_x.w1.weight"])
        out[f"{d}.ff.net.2.weight"] = state[f"{g}.mlp_x.w2.weight"]
        if not last:
            out[f"{d}.attn1.to_add_out.weight"] = state[f"{g}.attn.proj_y.weight"]
            out[f"{d}.attn1.to_add_out.bias"] = state[f"{g}.attn.proj_y.bias"]
            out[f"{d}.ff_context.net.0.proj.weight"] = swap_halves(state[f"{g}.mlp_y.w1.weight"])
            out[f"{d}.ff_context.net.2.weight"] = state[f"{g}.mlp_y.w2.weight"]
    return out


def build_pair(config: DiTConfig, seed: int = 0):
    state = random_dit_state_dict(config, seed)
    ours = MochiDiT(config)
    ours.load_state_dict(state)
    theirs = diffusers.MochiTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        num_layers=config.depth,
        pooled_projection_dim=config.hidden_size_y,
        in_channels=config.in_channels,
        text_embed_dim=config.t5_feat_dim,
        time_embed_dim=config.timestep_freq_dim,
    )
    missing, unexpected = theirs.load_state_dict(genmo_to_diffusers(state, config.depth), strict=True)
    assert not missing and not unexpected
    return ours.eval(), theirs.eval()


SMALL = DiTConfig(depth=3, num_heads=4, head_dim=48, hidden_size_x=192, hidden_size_y=96,
                  mlp_hidden_x=512, mlp_hidden_y=256, t5_feat_dim=64)


@pytest.fixture(scope="module")
def pair():
    return build_pair(SMALL)


@pytest.mark.parametrize("valid_tokens", [0, 1, 7, 256])
@pytest.mark.parametrize("T,H,W", [(1, 4, 4), (3, 6, 10), (2, 8, 6)])
def test_dit_forward_matches_diffusers(pair, valid_tokens, T, H, W):
    ours, theirs = pair
    generator = torch.Generator().manual_seed(valid_tokens * 100 + T * 10 + H)
    latent = torch.randn(1, 12, T, H, W, generator=generator)
    text = torch.randn(1, 256, SMALL.t5_feat_dim, generator=generator)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[0, :valid_tokens] = 1
    sigma = torch.tensor([0.63])
    with torch.no_grad():
        expected = theirs(latent, text, (1 - sigma) * 1000, mask, return_dict=False)[0]
        got = ours(latent, sigma, text, mask)
    assert got.shape == latent.shape
    err = (got - expected).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g} vs diffusers"


def test_demo_config_matches_diffusers():
    ours, theirs = build_pair(DEMO_DIT_CONFIG, seed=3)
    latent = torch.randn(1, 12, 2, 4, 6)
    text = torch.randn(1, 256, 4096)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[0, :11] = 1
    with torch.no_grad():
        expected = theirs(latent, text, torch.tensor([250.0]), mask, return_dict=False)[0]
        got = ours(latent, torch.tensor([0.75]), text, mask)
    assert (got - expected).abs().max().item() <= 1e-5


def test_text_padding_does_not_change_output(pair):
    """Packing: padded text tokens (any values) never influence the prediction."""
    ours, _ = pair
    latent = torch.randn(1, 12, 2, 4, 4)
    text = torch.randn(1, 256, SMALL.t5_feat_dim)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[0, :5] = 1
    other = text.clone()
    other[0, 5:] = torch.randn(251, SMALL.t5_feat_dim)
    with torch.no_grad():
        a = ours(latent, torch.tensor([0.5]), text, mask)
        b = ours(latent, torch.tensor([0.5]), other, mask)
        c = ours(latent, torch.tensor([0.5]), text[:, :5], mask[:, :5])
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() <= 1e-6
