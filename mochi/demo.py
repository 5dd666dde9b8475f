"""The built-in demo model: tiny, deterministic random weights with the real key names.

It lets the CLI, the nodes and the tests run the whole pipeline without downloading anything.
Its output is noise: it has never been trained. Everything that loads it goes through the same
loading code as the real checkpoints.
"""

import torch

from .dit import DiTConfig, MochiDiT

# Small enough for a CPU test, with 4 heads so Ulysses degrees 1, 2 and 4 all apply; the MLP
# widths follow genmo's rule (2/3 of 4x, rounded to 256) so diffusers builds the same shapes.
DEMO_DIT_CONFIG = DiTConfig(
    depth=2,
    num_heads=4,
    head_dim=48,
    hidden_size_x=192,
    hidden_size_y=96,
    mlp_hidden_x=512,
    mlp_hidden_y=256,
    t5_feat_dim=4096,
)

DEMO_NOTICE = (
    "Using the built-in DEMO model (tiny, random weights): its output is NOISE, not a video of "
    "your prompt. Give real Mochi weights for real output."
)


def random_dit_state_dict(config: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for a DiT of this size, keyed by genmo names.

    Every tensor is drawn (norm weights around 1, RoPE frequencies spread over a few octaves), so
    a test comparing two implementations exercises every parameter.
    """
    generator = torch.Generator().manual_seed(seed)
    model = MochiDiT(config)
    state = {}
    for name, tensor in model.state_dict().items():
        shape = tensor.shape
        if name.endswith("norm_x.weight") or name.endswith("norm_y.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "pos_frequencies":
            value = torch.rand(shape, generator=generator) * 0.5
        elif len(shape) >= 2:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        state[name] = value.contiguous()
    return state
