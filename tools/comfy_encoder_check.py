"""Our VAE encoder against ComfyUI's own: `comfy.sd.VAE` built from the same random full-size
encoder weights (the `encoder.` half of a mochi_vae.safetensors-shaped state dict), encoding the
same IMAGE frames the way core VAEEncode does (`vae.encode(pixels[:, :, :, :3])`). Not CI
(ComfyUI is not on PyPI); run with the harness venv and ComfyUI on the path:

    PYTHONPATH=/tmp/comfy/ComfyUI /tmp/comfy/venv/bin/python tools/comfy_encoder_check.py

It prints two differences: ComfyUI as it is (its temporal attention runs without genmo's causal
mask, so early latent frames see later ones), and ComfyUI with that one attention call made
causal, which must agree with ours to fp32 rounding; that run checks everything else ComfyUI's
VAEEncode does (x * 2 - 1, frames as time, the distribution's mean, no latent normalisation).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PACK_DIR = Path(__file__).resolve().parents[1]


def import_pack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mochi_xdit", PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["mochi_xdit"] = package
    spec.loader.exec_module(package)


def causal_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                     **kwargs):
    """ComfyUI's optimized_attention signature ([B, heads, L, D] in with skip_reshape), causal."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, D]
    return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])  # [B, L, heads*D]


def main() -> int:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`; read when model_management is imported
    import comfy.ldm.genmo.vae.model as comfy_mochi_vae
    import comfy.sd

    import_pack()
    from mochi_xdit.mochi.demo import random_vae_encoder_state_dict
    from mochi_xdit.mochi.vae_encoder import MochiVAEEncoder, VAEEncoderConfig, images_to_video

    torch.manual_seed(0)
    state = random_vae_encoder_state_dict(VAEEncoderConfig(), seed=5)
    vae = comfy.sd.VAE(sd={f"encoder.{k}": v for k, v in state.items()})
    ours = MochiVAEEncoder(VAEEncoderConfig())
    ours.load_state_dict(state)
    ours.eval()
    pixels = torch.rand(13, 32, 48, 3, generator=torch.Generator().manual_seed(1))  # IMAGE [F, H, W, 3]
    expected = ours.encode(images_to_video(pixels))  # [1, 12, 3, 4, 6]
    print(f"ComfyUI VAE dtype {vae.vae_dtype}; latent {tuple(expected.shape)}, std {expected.std().item():.3f}")

    as_is = vae.encode(pixels[:, :, :, :3]).float()
    diff = (as_is - expected).abs()
    per_frame = [f"{diff[:, :, t].max().item():.3g}" for t in range(diff.shape[2])]
    print(f"ComfyUI as is (non-causal attention): max {diff.max().item():.3g}, mean {diff.mean().item():.3g}; "
          f"per latent frame max {per_frame}")

    comfy_mochi_vae.optimized_attention = causal_attention
    causal = vae.encode(pixels[:, :, :, :3]).float()
    diff = (causal - expected).abs().max().item()
    print(f"ComfyUI with causal attention: max {diff:.3g} (expected <= 1e-4 x the latent scale)")
    return 0 if diff <= 1e-4 * expected.abs().max().item() else 1


if __name__ == "__main__":
    sys.exit(main())
