"""How the VAE decoder's 3D convolutions run on a GPU: `ConvSettings` (memory format and cuDNN's
autotuner), chosen once per rank by measurement (`measure_conv_settings`), never guessed.

Why measured: whether cuDNN's conv3d is faster with channels_last_3d tensors, and whether its
autotuner (`torch.backends.cudnn.benchmark`) finds better algorithms than its heuristics, depends on
the GPU, the cuDNN build and the shapes; both choices change speed, not results. Off CUDA nothing is
measured and the default (contiguous, no autotuning) stays.

Applying: the memory format is a property of the weights, set once when the decoder is loaded
(`apply_memory_format`; PyTorch runs a convolution channels-last when its weight is, and the
activations follow), and the autotuner flag is held only around decode calls (`ConvSettings.active`).
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONV_SETTINGS_REPEATS = 3  # timed calls per setting, after one warm-up (the autotuner's own search)


@dataclass(frozen=True)
class ConvSettings:
    """The decoder's conv3d settings.

    Args:
        channels_last: weights (and so activations) in torch.channels_last_3d.
        cudnn_benchmark: let cuDNN time its algorithms for each new shape (the first call of a shape
            pays for the search).
    """

    channels_last: bool = False
    cudnn_benchmark: bool = False

    def __post_init__(self):
        for name in ("channels_last", "cudnn_benchmark"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ConvSettings.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    @contextmanager
    def active(self):
        """Hold cuDNN's autotuner flag at this setting for the calls inside, then restore it."""
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous


ALL_CONV_SETTINGS = tuple(ConvSettings(layout, tuned) for layout in (False, True) for tuned in (False, True))


def apply_memory_format(decoder: torch.nn.Module, settings: ConvSettings) -> torch.nn.Module:
    """Put the decoder's 5-D weights in the settings' memory format (in place; returns the decoder)."""
    return decoder.to(memory_format=settings.memory_format)


def time_conv3d(settings: ConvSettings, shape: tuple[int, int, int, int, int], dtype: torch.dtype,
                device: torch.device, repeats: int = CONV_SETTINGS_REPEATS) -> float:
    """Median seconds of one 3x3x3 conv3d (C -> C) on an input of `shape` [B, C, T, H, W] under `settings`."""
    B, C, T, H, W = shape
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)  # [B, C, T, H, W]
    weight = torch.randn((C, C, 3, 3, 3), generator=generator, device=device, dtype=dtype) / (27 * C) ** 0.5
    x, weight = (t.contiguous(memory_format=settings.memory_format) for t in (x, weight))
    times = []
    with settings.active(), torch.no_grad():
        for i in range(1 + repeats):  # the first call warms up (and runs the autotuner's search)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            F.conv3d(x, weight)  # [B, C, T-2, H-2, W-2]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def fastest(timings: dict[ConvSettings, float]) -> ConvSettings:
    """The settings with the lowest time; the default when nothing was timed or on a tie with it."""
    if not timings:
        return ConvSettings()
    best = min(timings.values())
    default = ConvSettings()
    if timings.get(default) == best:
        return default
    return min(timings, key=lambda settings: timings[settings])


def measure_conv_settings(shape: tuple[int, int, int, int, int], dtype: torch.dtype,
                          device: torch.device) -> tuple[ConvSettings, dict[ConvSettings, float]]:
    """(the fastest settings, seconds per setting) for a decoder conv of `shape` on `device`.

    On CUDA every combination of `ALL_CONV_SETTINGS` is timed; elsewhere nothing is (the default
    stays, and the timings are empty).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return ConvSettings(), {}
    timings = {settings: time_conv3d(settings, shape, dtype, device) for settings in ALL_CONV_SETTINGS}
    return fastest(timings), timings


def decoder_conv_shape(config, tile_height: int = 32, tile_width: int = 32,
                       latent_frames: int = 2) -> tuple[int, int, int, int, int]:
    """[B, C, T, H, W] input of the decoder's costliest convs (the finest width at output resolution,
    padded) for one tile of `tile_height` x `tile_width` latent pixels and `latent_frames` frames."""
    scale = config.spatial_compression
    return (1, config.channels[0], config.video_frames(latent_frames) + 2, tile_height * scale + 2,
            tile_width * scale + 2)
