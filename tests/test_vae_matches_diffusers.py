"""Our VAE decoder against diffusers' AutoencoderKLMochi decoder with the same random weights.

Released diffusers differs from genmo in one place: genmo (and ComfyUI) drop the first e - 1
frames inside each depth-to-space-time upsampling, before the next causal convs; diffusers keeps
them through the remaining blocks and drops 5 frames at the end. Its causal convs therefore see
real frames instead of the replicated first frame, which changes the first frames of the video.
We follow genmo (the checkpoint was trained that way), so the oracle is checked twice:
- all frames against diffusers' own blocks run in genmo's order (the drop after each upsampling);
- `AutoencoderKLMochi.decode` itself, on every frame past the ones the start can reach.
"""

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_VAE_CONFIG, random_vae_state_dict
from mochi_xdit.mochi.vae import MochiVAEDecoder, VAEDecoderConfig

from diffusers import AutoencoderKLMochi  # the test oracle (pip install .[test])
from diffusers.models.autoencoders.autoencoder_kl_mochi import MochiDecoder3D

RESNET_PARTS = {"0": "norm1.norm_layer", "2": "conv1.conv", "3": "norm2.norm_layer", "5": "conv2.conv"}


def genmo_to_diffusers_decoder(state: dict[str, torch.Tensor], config: VAEDecoderConfig) -> dict[str, torch.Tensor]:
    """Key conversion genmo decoder -> diffusers `MochiDecoder3D` (test-only; no tensor changes)."""
    n = config.num_up_blocks
    out = {
        "conv_in.weight": state["blocks.0.0.weight"],
        "conv_in.bias": state["blocks.0.0.bias"],
        "proj_out.weight": state["output_proj.weight"],
        "proj_out.bias": state["output_proj.bias"],
    }

    def resnet(genmo: str, ours: str):
        for index, name in RESNET_PARTS.items():
            for param in ("weight", "bias"):
                out[f"{ours}.{name}.{param}"] = state[f"{genmo}.stack.{index}.{param}"]

    for j in range(config.num_res_blocks[-1]):
        resnet(f"blocks.0.{j + 1}", f"block_in.resnets.{j}")
    for i in range(1, n + 1):
        for j in range(config.num_res_blocks[-i - 1]):
            resnet(f"blocks.{i}.blocks.{j}", f"up_blocks.{i - 1}.resnets.{j}")
        for param in ("weight", "bias"):
            out[f"up_blocks.{i - 1}.proj.{param}"] = state[f"blocks.{i}.proj.{param}"]
    for j in range(config.num_res_blocks[0]):
        resnet(f"blocks.{n + 1}.{j}", f"block_out.resnets.{j}")
    return out


def diffusers_vae(config: VAEDecoderConfig) -> AutoencoderKLMochi:
    return AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),  # unused here; the smallest diffusers accepts
        decoder_block_out_channels=config.channels,
        latent_channels=config.latent_channels,
        out_channels=config.out_channels,
        layers_per_block=config.num_res_blocks,
        temporal_expansions=config.temporal_expansions,
    )


def build_pair(config: VAEDecoderConfig, seed: int):
    state = random_vae_state_dict(config, seed)
    ours = MochiVAEDecoder(config)
    ours.load_state_dict(state, strict=True)
    theirs = diffusers_vae(config)
    theirs.decoder.load_state_dict(genmo_to_diffusers_decoder(state, config), strict=True)
    return ours.eval(), theirs.eval()


def diffusers_blocks_in_genmo_order(decoder: MochiDecoder3D, latent: torch.Tensor) -> torch.Tensor:
    """diffusers' `MochiDecoder3D.forward`, with genmo's drop of the first e - 1 frames after each
    upsampling block instead of 5 frames at the end."""
    x = decoder.conv_in(latent)
    x, _ = decoder.block_in(x)
    for up_block in decoder.up_blocks:
        x, _ = up_block(x)
        x = x[:, :, up_block.temporal_expansion - 1 :]
    x, _ = decoder.block_out(x)
    x = decoder.nonlinearity(x)
    return decoder.proj_out(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def frames_reached_by_start(config: VAEDecoderConfig) -> int:
    """How many leading output frames can differ between genmo's and diffusers' drop order.

    Both agree until the first upsampling with e > 1; after it, each causal conv (2 per ResBlock)
    extends the differing prefix by 2 frames, and each later upsampling multiplies it by e.
    """
    n = config.num_up_blocks
    prefix, started = 0, False
    for i in range(1, n + 2):  # upsampling blocks coarse -> fine, then the last block
        res_blocks = config.num_res_blocks[n + 1 - i]
        if started:
            prefix += 2 * 2 * res_blocks
        if i <= n:
            expansion = config.temporal_expansions[n - i]
            prefix *= expansion
            started = started or expansion > 1
    return prefix


# The real decoder's structure (res blocks 3, 3, 4, 6, 3; time 1, 2, 3; space 2, 2, 2) at widths
# diffusers can build (its GroupNorm has 32 groups) and that run in seconds on 2 CPU cores.
ORACLE_CONFIG = VAEDecoderConfig(channels=(32, 32, 64, 64))


@pytest.fixture(scope="module")
def pair():
    return build_pair(ORACLE_CONFIG, seed=1)


@pytest.mark.parametrize("T,H,W", [(3, 3, 5), (2, 4, 2), (1, 3, 4)])
def test_vae_decoder_matches_diffusers_blocks_in_genmo_order(pair, T, H, W):
    ours, theirs = pair
    latent = torch.randn(1, 12, T, H, W, generator=torch.Generator().manual_seed(T * 100 + H * 10 + W))
    with torch.no_grad():
        expected = diffusers_blocks_in_genmo_order(theirs.decoder, latent)
        got = ours.decode(latent)
    assert got.shape == (1, 3, 6 * T - 5, 8 * H, 8 * W)
    err = (got - expected).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g} vs diffusers blocks"


def test_vae_decoder_matches_diffusers_decode_past_the_start_frames(pair):
    """diffusers' public decode() agrees on every frame the start of the video cannot reach."""
    ours, theirs = pair
    first_equal = frames_reached_by_start(ORACLE_CONFIG)  # 56 for this structure
    T = (first_equal + 5) // 6 + 2  # enough latent frames for 12 or more comparable frames
    latent = torch.randn(2, 12, T, 2, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs.decode(latent).sample
        got = ours.decode(latent)
    assert got.shape == expected.shape == (2, 3, 6 * T - 5, 16, 24)
    err = (got[:, :, first_equal:] - expected[:, :, first_equal:]).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g} vs AutoencoderKLMochi.decode past frame {first_equal}"


def test_demo_vae_decoder_runs_and_matches_its_shapes():
    """The built-in demo decoder (16 GroupNorm groups, which diffusers cannot build) decodes to
    exactly 6T - 5 frames and 8x the latent size, and its file shapes give back its config."""
    state = random_vae_state_dict(DEMO_VAE_CONFIG, seed=0)
    assert VAEDecoderConfig.from_shapes({k: tuple(v.shape) for k, v in state.items()}) == DEMO_VAE_CONFIG
    decoder = MochiVAEDecoder(DEMO_VAE_CONFIG)
    decoder.load_state_dict(state, strict=True)
    video = decoder.decode(torch.randn(1, 12, 3, 5, 3))
    assert video.shape == (1, 3, 13, 40, 24)
    assert torch.isfinite(video).all()


def test_real_decoder_has_diffusers_structure_and_genmo_keys():
    """At full size (on the meta device), every one of our tensors maps onto diffusers' default
    decoder with the same shape and covers it; the shapes alone give back the real config."""
    with torch.device("meta"):
        ours = MochiVAEDecoder(VAEDecoderConfig())
        theirs = MochiDecoder3D(in_channels=12, out_channels=3)
    state = ours.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    assert VAEDecoderConfig.from_shapes(shapes) == VAEDecoderConfig()
    assert len(state) == 19 * 8 + 2 + 3 * 2 + 2  # 19 ResBlocks, input conv, 3 projs, output_proj
    assert {"blocks.0.0.weight", "blocks.0.3.stack.5.bias", "blocks.1.blocks.5.stack.3.weight",
            "blocks.3.proj.weight", "blocks.4.2.stack.2.weight", "output_proj.bias"} <= set(state)
    mapped = genmo_to_diffusers_decoder(state, VAEDecoderConfig())
    expected = {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in mapped.items()} == expected
    assert shapes["blocks.0.0.weight"] == (768, 12, 1, 1, 1)
    assert shapes["blocks.1.proj.weight"] == (512 * 3 * 4, 768)
    assert shapes["output_proj.weight"] == (3, 128)
    assert sum(t.numel() for t in state.values()) == 362_526_595


@pytest.mark.parametrize(
    "dropped", ["blocks.0.0.weight", "output_proj.weight", "blocks.1.proj.weight", "blocks.2.proj.weight"]
)
def test_from_shapes_names_a_missing_key(dropped):
    shapes = {k: tuple(v.shape) for k, v in random_vae_state_dict(DEMO_VAE_CONFIG).items()}
    del shapes[dropped]
    with pytest.raises(KeyError, match=dropped.replace(".", r"\.")):
        VAEDecoderConfig.from_shapes(shapes)


def test_decode_rejects_a_wrong_latent_with_its_shape():
    decoder = MochiVAEDecoder(DEMO_VAE_CONFIG)
    with pytest.raises(ValueError, match=r"\[B, 12, T, H, W\].*\(1, 16, 2, 4, 4\)"):
        decoder.decode(torch.zeros(1, 16, 2, 4, 4))
