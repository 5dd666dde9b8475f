"""MochiTiledVAEEncode's checks: each bad input gets one message with the fix, before the pool is
touched; tiling widgets become latent cells. (Encoding on a pool: tests/test_pool.py; through a
real ComfyUI server: tools/comfy_server_check.py.)"""

import types

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import CheckpointError
from mochi_xdit.mochi.demo import DEMO_VAE_CONFIG, random_vae_state_dict
from mochi_xdit.nodes.checks import QueueTimeError
from mochi_xdit.nodes.encode import MochiTiledVAEEncode, encode_tile_spec, image_problem
from mochi_xdit.nodes.handle import PoolHandle


@pytest.mark.parametrize("shape,fragment", [
    ((0, 64, 64, 3), "empty video (0 frames of 64x64)"),
    ((7, 64, 64, 4), "4 channels per pixel; the Mochi VAE encodes RGB (3): drop the alpha channel with SplitImageWithAlpha"),
    ((7, 64, 64, 1), "1 channels per pixel; the Mochi VAE encodes RGB (3): connect RGB frames"),
    ((10, 64, 64, 3), "10 frames; Mochi encodes 6k + 1 frames: use 7 or 13 frames"),
    ((7, 64, 72, 3), "width 72 is not a multiple of 16; resize or crop to 64 or 80"),
    ((7, 8, 64, 3), "height 8 is not a multiple of 16; resize or crop to 16"),
])
def test_bad_images_get_one_message_with_the_fix(shape, fragment):
    assert fragment in image_problem(torch.zeros(shape))


def test_good_images_pass():
    assert image_problem(torch.zeros(13, 32, 48, 3)) is None
    assert image_problem(torch.zeros(1, 16, 16, 3)) is None


def test_decoder_only_vae_is_refused_before_the_pool_is_touched(tmp_path):
    path = tmp_path / "decoder.safetensors"
    save_file({f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG).items()}, path)
    handle = PoolHandle(types.SimpleNamespace(vae_path=str(path)))  # pool_for(handle) would fail: never reached
    with pytest.raises(CheckpointError, match="it has no encoder, so it cannot encode video.*mochi_vae.safetensors"):
        MochiTiledVAEEncode().encode(handle, torch.zeros(7, 32, 32, 3), "auto", 256, 64)


def test_bad_image_is_refused_with_the_node_name():
    with pytest.raises(ValueError, match=r"MochiTiledVAEEncode: pixels has 4 channels"):
        MochiTiledVAEEncode().encode(None, torch.zeros(7, 32, 32, 4), "auto", 256, 64)


def test_tiling_widgets_are_checked_at_queue_time_and_become_latent_cells():
    validate = MochiTiledVAEEncode.VALIDATE_INPUTS
    assert validate(tiling="manual", tile_size=256, tile_overlap=64) is True
    with pytest.raises(QueueTimeError, match="multiples of 8"):
        validate(tiling="manual", tile_size=260, tile_overlap=64)
    with pytest.raises(QueueTimeError, match="at most half of tile_size"):
        validate(tiling="manual", tile_size=64, tile_overlap=40)
    spec = encode_tile_spec("manual", 256, 64, (1, 3, 7, 480, 848))
    assert (spec.tile_height, spec.tile_width, spec.overlap) == (32, 32, 8)
    whole = encode_tile_spec("off", 256, 64, (1, 3, 7, 480, 848))
    assert (whole.tile_height, whole.tile_width, whole.overlap) == (60, 106, 0)
    assert encode_tile_spec("auto", 256, 64, (1, 3, 7, 480, 848)) is None
