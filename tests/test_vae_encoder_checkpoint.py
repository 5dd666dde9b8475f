"""Loading Mochi's VAE encoder: genmo's bare encoder.safetensors, the `encoder.` half of ComfyUI's
mochi_vae.safetensors, and a decoder-only file refused with the sentence that says which files
carry an encoder."""

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import CheckpointError, inspect_checkpoint, load_vae_encoder, vae_encoder_prefix
from mochi_xdit.mochi.demo import (DEMO_VAE_CONFIG, DEMO_VAE_ENCODER_CONFIG, demo_checkpoints, random_vae_encoder_state_dict,
                                   random_vae_state_dict)
from mochi_xdit.mochi.vae_encoder import MochiVAEEncoder


def test_encoder_round_trip_bare_and_full_vae(tmp_path):
    state = random_vae_encoder_state_dict(DEMO_VAE_ENCODER_CONFIG, seed=4)
    reference = MochiVAEEncoder(DEMO_VAE_ENCODER_CONFIG)
    reference.load_state_dict(state)
    video = torch.rand(1, 3, 7, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = reference.encode(video)
    bare, full = tmp_path / "encoder.safetensors", tmp_path / "mochi_vae.safetensors"
    save_file(state, bare)
    save_file({**{f"encoder.{k}": v for k, v in state.items()},
               **{f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG).items()}}, full)
    for path, prefix in ((bare, ""), (full, "encoder.")):
        info = inspect_checkpoint(path)
        assert info.kind == "vae" and info.has_vae_encoder and vae_encoder_prefix(info) == prefix
        encoder = load_vae_encoder(path)
        assert encoder.config == DEMO_VAE_ENCODER_CONFIG
        assert (encoder.encode(video) - expected).abs().max().item() <= 1e-5


def test_decoder_only_vae_is_refused_naming_the_files_with_an_encoder(tmp_path):
    path = tmp_path / "decoder.safetensors"
    save_file({f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG).items()}, path)
    with pytest.raises(CheckpointError, match=r"it has no encoder, so it cannot encode video.*"
                       r"mochi_vae.safetensors \(Comfy-Org's repackage: encoder \+ decoder\) and genmo's "
                       r"encoder.safetensors carry the encoder; genmo's decoder.safetensors"):
        load_vae_encoder(path)


def test_demo_vae_file_carries_an_encoder(tmp_path):
    _, vae_path = demo_checkpoints(tmp_path)
    assert load_vae_encoder(vae_path).config == DEMO_VAE_ENCODER_CONFIG
