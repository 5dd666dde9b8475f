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


# --- VAE decoder ------------------------------------------------------------------------------

from .vae import MochiVAEDecoder, VAEDecoderConfig, default_norm_groups  # noqa: E402

# The real decoder's structure (3 upsampling blocks: 8x space, 6x time) at 1/8 of its widths;
# GroupNorm groups follow `default_norm_groups` (16 here), as `VAEDecoderConfig.from_shapes` does.
_DEMO_VAE_CHANNELS = (16, 32, 64, 96)
DEMO_VAE_CONFIG = VAEDecoderConfig(
    channels=_DEMO_VAE_CHANNELS,
    num_res_blocks=(1, 1, 2, 2, 1),
    temporal_expansions=(1, 2, 3),
    norm_groups=default_norm_groups(_DEMO_VAE_CHANNELS),
)


def random_vae_state_dict(config: VAEDecoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for a VAE decoder of this size, keyed by genmo names (no prefix).

    Convs and projections are drawn with 1/sqrt(fan_in) scale, norm weights around 1 and biases
    small, so every parameter matters and activations stay O(1) through the residual stacks.
    """
    return _random_vae_state(MochiVAEDecoder, config, seed)


def random_vae_encoder_state_dict(config: "VAEEncoderConfig", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for a VAE encoder of this size, keyed by genmo names (no prefix); the
    recipe of `random_vae_state_dict`."""
    return _random_vae_state(MochiVAEEncoder, config, seed)


def _is_norm_affine(name: str) -> bool:
    return any(part in name for part in (".stack.0.", ".stack.3.", "attn_block.norm.", "output_norm."))


def _random_vae_state(model_class, config, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in model_class(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = shape[1:].numel()
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        elif _is_norm_affine(name):  # GroupNorm affine
            value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        state[name] = value.contiguous()
    return state


# --- VAE encoder ------------------------------------------------------------------------------

from .vae_encoder import MochiVAEEncoder, VAEEncoderConfig  # noqa: E402

# The real encoder's structure (3 downsampling blocks, attention after the first group) at 1/4 of
# its widths (the narrowest whose attention widths are multiples of the 32-wide heads).
_DEMO_ENCODER_CHANNELS = (16, 32, 64, 96)
DEMO_VAE_ENCODER_CONFIG = VAEEncoderConfig(
    channels=_DEMO_ENCODER_CHANNELS,
    num_res_blocks=(1, 1, 2, 2, 1),
    temporal_reductions=(1, 2, 3),
    has_attention=(False, True, True, True, True),
    norm_groups=default_norm_groups(_DEMO_ENCODER_CHANNELS),
)


# --- Demo checkpoint files ------------------------------------------------------------------------

import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

DEMO_DIR_ENV = "MOCHI_XDIT_DEMO_DIR"  # overrides the cache folder; read at call time
DEMO_SEED = 0
_DEMO_FILE_VERSION = "2"  # bump when the demo configs or weight recipes change (2: VAE gains an encoder)
_DEMO_METADATA = {"mochi_xdit_demo": _DEMO_FILE_VERSION, "notice": DEMO_NOTICE}

logger = logging.getLogger(__name__)


def demo_dir() -> Path:
    """Where the demo safetensors live: $MOCHI_XDIT_DEMO_DIR, else ~/.cache/mochi_xdit/demo."""
    override = os.environ.get(DEMO_DIR_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "mochi_xdit" / "demo"


def _write_once(path: Path, make_state) -> None:
    """Write a safetensors file unless an up-to-date one is there; atomic (temp file + rename), so
    several processes (Ray actors) creating it at once all end up reading a complete file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("mochi_xdit_demo") == _DEMO_FILE_VERSION:
                    return
        except Exception as error:  # a damaged file from an interrupted write: replace it
            logger.warning("rewriting damaged demo file %s (%s)", path, error)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(make_state(), str(temporary), metadata=_DEMO_METADATA)
    os.replace(temporary, path)


def demo_paths(directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Where `demo_checkpoints` keeps the demo DiT and VAE (written or not yet)."""
    folder = Path(directory) if directory is not None else demo_dir()
    return (folder / f"mochi_demo_dit_v{_DEMO_FILE_VERSION}.safetensors",
            folder / f"mochi_demo_vae_v{_DEMO_FILE_VERSION}.safetensors")


def demo_checkpoints(directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write (first time only) and return the demo DiT and VAE files.

    Deterministic: fixed configs (`DEMO_DIT_CONFIG`, `DEMO_VAE_CONFIG`, `DEMO_VAE_ENCODER_CONFIG`)
    and seed, fp32, genmo key names (the VAE laid out like ComfyUI's mochi_vae.safetensors: a
    `decoder.` and an `encoder.` half), so they load through the same `checkpoint.load_dit` /
    `load_vae_decoder` / `load_vae_encoder` code as real weights.

    Args:
        directory: target folder; default `demo_dir()`.

    Returns:
        (dit_path, vae_path).
    """
    dit_path, vae_path = demo_paths(directory)
    _write_once(dit_path, lambda: random_dit_state_dict(DEMO_DIT_CONFIG, DEMO_SEED))
    _write_once(vae_path, lambda: {
        **{f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG, DEMO_SEED).items()},
        **{f"encoder.{k}": v for k, v in random_vae_encoder_state_dict(DEMO_VAE_ENCODER_CONFIG, DEMO_SEED).items()},
    })
    return dit_path, vae_path


def load_demo_models(weight_dtype: str = "fp32", device: str = "cpu", directory: str | os.PathLike | None = None):
    """The demo DiT and VAE decoder, loaded from their files like real weights. Output is noise.

    Returns:
        (MochiDiT, MochiVAEDecoder).
    """
    from .checkpoint import load_dit, load_vae_decoder

    dit_path, vae_path = demo_checkpoints(directory)  # the loaders shout DEMO_NOTICE for these files
    vae_dtype = "fp32" if weight_dtype in ("fp32", "fp8") else weight_dtype
    return load_dit(dit_path, weight_dtype, device), load_vae_decoder(vae_path, vae_dtype, device)


# --- Random weights made on the device, any size (benchmarks of the full model) -------------------

_STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fill_random(model: torch.nn.Module, value, device: torch.device) -> None:
    """Replace every parameter of a meta-device `model` by `value(name, shape)` (a tensor on
    `device`), one at a time, so the device never holds more than the model plus one tensor."""
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                full = f"{module_name}.{name}" if module_name else name
                module._parameters[name] = torch.nn.Parameter(value(module, full, param.shape), requires_grad=False)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise RuntimeError(f"random weights: buffers {left} have no recipe; add one in mochi/demo.py")
    model.eval()


def random_dit(config: DiTConfig, weight_dtype: str = "bf16", device: str | torch.device = "cpu", seed: int = 0) -> MochiDiT:
    """A DiT of any size with random weights drawn straight on `device`, stored as
    `checkpoint.load_dit` stores a real file's (no 20 GB file, no CPU copy): "bf16" / "fp16" /
    "fp32" everywhere, or "fp8" Linear weights (float8_e4m3fn with a per-tensor fp32
    `scale_weight`) and bf16 elsewhere; `pos_frequencies` always fp32. Recipe as
    `random_dit_state_dict` (norm weights around 1, 1/sqrt(fan_in) matrices), drawn on the device.
    Output is noise: for timing and memory, never for quality."""
    from .layers import Linear, quantise_fp8

    if weight_dtype not in (*_STORAGE_DTYPES, "fp8"):
        raise ValueError(f"weight_dtype={weight_dtype!r}; use one of {', '.join(_STORAGE_DTYPES)} or fp8")
    device = torch.device(device)
    dtype = _STORAGE_DTYPES.get(weight_dtype, torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = MochiDiT(config)

    def value(module, name, shape):
        if name == "pos_frequencies":
            return torch.rand(shape, generator=generator, device=device).mul_(0.5)
        if name.endswith("norm_x.weight") or name.endswith("norm_y.weight"):
            return torch.empty(shape, dtype=dtype, device=device).normal_(1.0, 0.1, generator=generator)
        if len(shape) >= 2:
            fan_in = shape[1:].numel()
            weight = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, fan_in**-0.5, generator=generator)
            if weight_dtype == "fp8" and isinstance(module, Linear):
                weight, module.scale_weight = quantise_fp8(weight)  # [out, in] float8_e4m3fn, fp32 scale
            return weight
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)

    _fill_random(model, value, device)
    return model


def random_vae_decoder(config: VAEDecoderConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                       seed: int = 0) -> MochiVAEDecoder:
    """A VAE decoder of any size with random weights drawn straight on `device` in `dtype`
    (recipe as `random_vae_state_dict`). Output is noise: for timing and memory only."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = MochiVAEDecoder(config)

    def value(module, name, shape):
        if len(shape) >= 2:
            return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, shape[1:].numel() ** -0.5,
                                                                          generator=generator)
        if ".stack.0." in name or ".stack.3." in name:  # GroupNorm affine
            mean = 1.0 if name.endswith("weight") else 0.0
            return torch.empty(shape, dtype=dtype, device=device).normal_(mean, 0.1, generator=generator)
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)

    _fill_random(model, value, device)
    return model
