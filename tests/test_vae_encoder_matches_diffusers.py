"""Our VAE encoder against diffusers' AutoencoderKLMochi encoder with the same random weights.

diffusers follows genmo here (causal temporal attention, causal strided convs, Fourier features
in fp32), so the whole latent mean is compared, every frame.
"""

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_VAE_ENCODER_CONFIG, random_vae_encoder_state_dict
from mochi_xdit.mochi.vae_encoder import MochiVAEEncoder, VAEEncoderConfig, images_to_video

from diffusers import AutoencoderKLMochi  # the test oracle (pip install .[test])
from diffusers.models.autoencoders.autoencoder_kl_mochi import MochiEncoder3D

RESNET_PARTS = {"0": "norm1.norm_layer", "2": "conv1.conv", "3": "norm2.norm_layer", "5": "conv2.conv"}


def genmo_to_diffusers_encoder(state: dict[str, torch.Tensor], config: VAEEncoderConfig) -> dict[str, torch.Tensor]:
    """Key conversion genmo encoder -> diffusers `MochiEncoder3D` (test-only; qkv split in three)."""
    out = {"proj_in.weight": state["layers.0.weight"], "proj_in.bias": state["layers.0.bias"],
           "norm_out.norm_layer.weight": state["output_norm.weight"],
           "norm_out.norm_layer.bias": state["output_norm.bias"],
           "proj_out.weight": state["output_proj.weight"]}

    def resnet(genmo: str, ours: str, j: int):
        for index, name in RESNET_PARTS.items():
            for param in ("weight", "bias"):
                out[f"{ours}.resnets.{j}.{name}.{param}"] = state[f"{genmo}.stack.{index}.{param}"]
        if f"{genmo}.attn_block.attn.qkv.weight" in state:
            q, k, v = state[f"{genmo}.attn_block.attn.qkv.weight"].chunk(3)
            out.update({f"{ours}.attentions.{j}.to_q.weight": q, f"{ours}.attentions.{j}.to_k.weight": k,
                        f"{ours}.attentions.{j}.to_v.weight": v})
            for param in ("weight", "bias"):
                out[f"{ours}.attentions.{j}.to_out.0.{param}"] = state[f"{genmo}.attn_block.attn.out.{param}"]
                out[f"{ours}.norms.{j}.norm_layer.{param}"] = state[f"{genmo}.attn_block.norm.{param}"]

    index = 1
    for j in range(config.num_res_blocks[0]):
        resnet(f"layers.{index}", "block_in", j)
        index += 1
    for i in range(len(config.temporal_reductions)):
        for param in ("weight", "bias"):
            out[f"down_blocks.{i}.conv_in.conv.{param}"] = state[f"layers.{index}.layers.0.{param}"]
        for j in range(config.num_res_blocks[i + 1]):
            resnet(f"layers.{index}.layers.{j + 1}", f"down_blocks.{i}", j)
        index += 1
    for j in range(config.num_res_blocks[-1]):
        resnet(f"layers.{index}", "block_out", j)
        index += 1
    return out


def diffusers_vae(config: VAEEncoderConfig) -> AutoencoderKLMochi:
    return AutoencoderKLMochi(
        in_channels=15,
        encoder_block_out_channels=config.channels,
        decoder_block_out_channels=(32, 32, 32, 32),  # unused here
        latent_channels=config.latent_channels,
        layers_per_block=config.num_res_blocks,
        temporal_expansions=config.temporal_reductions,
        add_attention_block=config.has_attention,
    )


# The real encoder's structure (res blocks 3, 3, 4, 6, 3; time 1, 2, 3; attention after the first
# group) at widths diffusers can build (32 GroupNorm groups, 32-wide heads) that run on 2 CPU cores.
ORACLE_CONFIG = VAEEncoderConfig(channels=(32, 64, 64, 96))


@pytest.fixture(scope="module")
def pair():
    state = random_vae_encoder_state_dict(ORACLE_CONFIG, seed=3)
    ours = MochiVAEEncoder(ORACLE_CONFIG)
    ours.load_state_dict(state, strict=True)
    theirs = diffusers_vae(ORACLE_CONFIG)
    theirs.encoder.load_state_dict(genmo_to_diffusers_encoder(state, ORACLE_CONFIG), strict=True)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("F,H,W", [(13, 16, 24), (1, 8, 16), (7, 24, 8)])
def test_vae_encoder_matches_diffusers_latent_mean(pair, F, H, W):
    ours, theirs = pair
    video = torch.rand(2, 3, F, H, W, generator=torch.Generator().manual_seed(F + H + W)) * 2 - 1
    with torch.no_grad():
        expected = theirs.encode(video).latent_dist.mean
        got = ours.encode(video)
    assert got.shape == expected.shape == (2, 12, (F - 1) // 6 + 1, H // 8, W // 8)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4 * expected.abs().max().item(), f"max abs error {err:.3g} vs AutoencoderKLMochi.encode"


def test_real_encoder_has_diffusers_structure_and_comfy_keys():
    """At full size (meta device): 243 tensors as in ComfyUI's mochi_vae.safetensors, ComfyUI's key
    names, every tensor maps onto diffusers' default encoder, and the shapes give back the config."""
    with torch.device("meta"):
        ours = MochiVAEEncoder(VAEEncoderConfig())
        theirs = MochiEncoder3D(in_channels=15, out_channels=12, block_out_channels=(64, 128, 256, 384))
    state = ours.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    assert len(state) == 243
    assert VAEEncoderConfig.from_shapes(shapes) == VAEEncoderConfig()
    assert shapes["layers.4.layers.1.attn_block.attn.qkv.weight"] == (384, 128)
    assert shapes["layers.0.weight"] == (64, 15)
    assert shapes["layers.6.layers.0.weight"] == (384, 256, 3, 2, 2)
    assert shapes["output_proj.weight"] == (24, 384)
    assert "layers.1.attn_block.norm.weight" not in shapes
    mapped = genmo_to_diffusers_encoder(state, VAEEncoderConfig())
    assert {n: tuple(t.shape) for n, t in mapped.items()} == {n: tuple(t.shape) for n, t in theirs.state_dict().items()}


def test_demo_encoder_shapes_give_back_its_config():
    state = random_vae_encoder_state_dict(DEMO_VAE_ENCODER_CONFIG, seed=0)
    assert VAEEncoderConfig.from_shapes({k: tuple(v.shape) for k, v in state.items()}) == DEMO_VAE_ENCODER_CONFIG


def test_images_become_the_encoder_input_as_in_core_vae_encode():
    """ComfyUI IMAGE [F, H, W, 3] in [0, 1] -> [1, 3, F, H, W] in [-1, 1] (VAE.encode's process_input)."""
    images = torch.rand(7, 16, 24, 3)
    video = images_to_video(images)
    assert video.shape == (1, 3, 7, 16, 24)
    assert torch.equal(video[0, :, 2], images[2].permute(2, 0, 1) * 2 - 1)


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 10, 16, 16), r"6k \+ 1 frames; got 10; use 7 or 13 frames"),
    ((1, 3, 7, 20, 16), r"height that is a multiple of 8; got 20; use 16 or 24"),
    ((1, 4, 7, 16, 16), r"\[B, 3, F, H, W\]"),
])
def test_encode_rejects_bad_videos_with_the_nearest_valid_sizes(shape, match):
    encoder = MochiVAEEncoder(DEMO_VAE_ENCODER_CONFIG)
    with pytest.raises(ValueError, match=match):
        encoder.encode(torch.zeros(shape))
