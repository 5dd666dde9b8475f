"""Reading the CLI's `--input-video` with PyAV, checked against Mochi's size rules.

Frames: Mochi encodes 6k + 1 frames. `--frames N` takes the first N frames (N = 6k + 1, at most
what the file has); without it the largest 6k + 1 count the file has is taken and the CLI says so.
Size: width and height must already be multiples of 16 (nothing is resized; the error names the
nearest valid sizes). Frame rate: the file's, unless --fps is given.
"""

from dataclasses import dataclass

import numpy
import torch

from .mochi.constants import SIZE_MULTIPLE, TEMPORAL_COMPRESSION
from .mochi.vae_encoder import nearest_frame_counts, nearest_multiples


@dataclass(frozen=True)
class InputVideo:
    """Frames of an input video, ready to encode.

    Args:
        frames: [F, H, W, 3] float32 in [0, 1] (ComfyUI's IMAGE layout), F = 6k + 1.
        fps: the file's average frame rate, rounded (30 when the file does not say).
        available: frames the file holds (F of them are used), or F when `--frames` stopped decoding
            there.
    """

    frames: torch.Tensor
    fps: int
    available: int

    @property
    def size(self) -> tuple[int, int, int]:
        """(width, height, frames)."""
        F, H, W, _ = self.frames.shape
        return W, H, F


def read_input_video(path: str, frames: int | None = None) -> InputVideo:
    """Decode `path` with PyAV and pick Mochi's frames.

    Args:
        path: a video file PyAV (FFmpeg) can read.
        frames: how many leading frames to use (6k + 1), or None for the largest 6k + 1 count.

    Raises ValueError (what was wrong, the values, the fix) for an unreadable or empty video, a
    frame count that is not 6k + 1 or more than the file has, or a size off Mochi's 16-pixel grid.
    """
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream; give a video file (e.g. an mp4)")
            stream = container.streams.video[0]
            rate = stream.average_rate
            decoded = []
            for frame in container.decode(stream):
                decoded.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3] uint8
                if frames is not None and len(decoded) == frames:  # enough: the rest is never decoded
                    break
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(f"cannot read {path} as a video ({error}); give an mp4/webm/mov file") from None
    available = len(decoded)
    if available == 0:
        raise ValueError(f"{path} holds no frames; give a video with at least 1 frame (Mochi uses 6k + 1)")
    if frames is None:
        frames = (available - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1
    elif frames < 1 or (frames - 1) % TEMPORAL_COMPRESSION:
        raise ValueError(f"--frames={frames}: Mochi encodes {TEMPORAL_COMPRESSION}k + 1 frames; use "
                         f"{nearest_frame_counts(max(frames, 1), TEMPORAL_COMPRESSION)}")
    elif frames > available:
        most = (available - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1
        raise ValueError(f"--frames={frames} but {path} has {available} frames; use at most {most}")
    H, W = decoded[0].shape[:2]
    for name, size in (("width", W), ("height", H)):
        if size % SIZE_MULTIPLE:
            raise ValueError(f"{path} is {W}x{H}: its {name} is not a multiple of {SIZE_MULTIPLE}; resize or crop it "
                             f"to {nearest_multiples(size, SIZE_MULTIPLE)} first (e.g. ffmpeg -vf crop=...)")
    pixels = torch.from_numpy(numpy.stack(decoded[:frames]))  # [F, H, W, 3] uint8
    fps = round(float(rate)) if rate else 30
    return InputVideo(pixels.float().div_(255.0), max(fps, 1), available)
