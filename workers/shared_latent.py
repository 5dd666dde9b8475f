"""`SharedLatents`: how a sampler in the driver (ComfyUI's own samplers) hands each model evaluation's
latent to the ranks of a private pool, and gets the result back, through two memory-mapped files
instead of Ray's object store.

Why: every evaluation moves a latent to the ranks and one back. Through the object store a full-size
fp32 latent (8.5 MiB) took ~41 ms per round trip on our CPU machines, through shared files ~9 ms (a
copy each way; bench/pool_overhead.py prints both). All ranks of a private pool run on this machine,
so they all map the one input file: the latent is written once, whatever the world size, and only
rank 0 writes the result. The files live in a folder only this user can open (in /dev/shm where it
exists, so they stay in memory), are reused for every evaluation of the same shape, and are removed
when the evaluations end.

Cluster pools (ranks on other machines) send the latent through the object store to rank 0 only;
the other ranks get `BroadcastLatent` and receive it from rank 0 over the pool's own process group
(NCCL on GPUs), so it crosses to one node, not to every node.
"""

import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

SHARED_MEMORY_DIR = "/dev/shm"


@dataclass(frozen=True)
class SharedLatentFiles:
    """The two fp32 buffers of one evaluation, as the ranks map them (this travels in the call).

    Args:
        input_path, input_shape: the noisy latent [B, 12, T, H, W] the driver wrote.
        output_path, output_shape: where rank 0 writes the result ([B, 12, T, H, W], or
            [2, B, 12, T, H, W] for both branches).
    """

    input_path: str
    input_shape: tuple[int, ...]
    output_path: str
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class BroadcastLatent:
    """Tells a rank other than 0 that the evaluation's latent comes from rank 0 by broadcast.

    Args:
        shape: the latent's shape [B, 12, T, H, W] (fp32).
    """

    shape: tuple[int, ...]


def map_float32(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An fp32 tensor of `shape` backed by the file at `path` (shared with every process mapping it)."""
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)


def _new_buffer(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A new fp32 file of `shape`, its space reserved now: a full /dev/shm (a container's is often
    64 MB) raises OSError here instead of killing the process with SIGBUS at the first write."""
    with open(path, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, math.prod(shape) * 4)
    return map_float32(path, shape)


class SharedLatents:
    """Driver side: owns the folder and the buffers for one `Pool.evaluations` block.

    Usage: `files = shared.send(latent, output_shape)`, call the ranks with `files`, then
    `shared.receive()`; `close()` removes the files. A new shape gets new files (new names), so a rank
    never maps a file that changed size under it.
    """

    def __init__(self):
        base = SHARED_MEMORY_DIR if os.path.isdir(SHARED_MEMORY_DIR) else None
        self.folder = tempfile.mkdtemp(prefix="mochi_xdit_latents_", dir=base)  # mode 0700
        self.files: SharedLatentFiles | None = None
        self._input = self._output = None
        self._made = 0

    def send(self, latent: torch.Tensor, output_shape: tuple[int, ...]) -> SharedLatentFiles:
        """Write `latent` (any dtype and device; stored fp32) into the input buffer; returns the files.

        Raises:
            OSError: no room for new buffers (the caller sends through the object store instead).
        """
        shape = tuple(latent.shape)
        if self.files is None or self.files.input_shape != shape or self.files.output_shape != tuple(output_shape):
            self._made += 1
            files = SharedLatentFiles(os.path.join(self.folder, f"input{self._made}"), shape,
                                      os.path.join(self.folder, f"output{self._made}"), tuple(output_shape))
            self._input = _new_buffer(files.input_path, files.input_shape)
            self._output = _new_buffer(files.output_path, files.output_shape)
            self.files = files
        self._input.copy_(latent.detach())
        return self.files

    def receive(self) -> torch.Tensor:
        """A fresh (writable, unshared) copy of what rank 0 wrote into the output buffer."""
        return self._output.clone()

    def close(self) -> None:
        self._input = self._output = self.files = None
        shutil.rmtree(self.folder, ignore_errors=True)
