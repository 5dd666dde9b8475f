"""`SharedLatents`: how a sampler in the driver (ComfyUI's own samplers) hands each model evaluation's
latent to the ranks of a private pool, and gets the result back, through memory-mapped files instead
of Ray's object store.

Why: every evaluation moves a latent to the ranks and one back. Through the object store a full-size
fp32 latent (8.5 MiB) took 18-41 ms per round trip on our CPU machines; through shared files it is one
copy in (the driver writes the sampler's latent into the input file) and one out (rank 0 writes x0
into an output file, which the sampler then gets as it is, mapped: no copy back, no new allocation;
bench/pool_overhead.py measures the whole path at full size). All ranks of a private pool run on
this machine, so they all map the one input file: the latent is written once, whatever the world
size, and only rank 0 writes the result. The files live in a folder only this user can open (in
/dev/shm where it exists, so they stay in memory), are reused for every evaluation of the same shape
(an output file once the sampler has let go of the result in it), and are removed when the
evaluations end.

Cluster pools (ranks on other machines) send the latent through the object store to rank 0 only;
the other ranks get `BroadcastLatent` and receive it from rank 0 over the pool's own process group
(NCCL on GPUs), so it crosses to one node, not to every node.
"""

import math
import mmap
import os
import shutil
import tempfile
import weakref
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


def _new_file(path: str, shape: tuple[int, ...]) -> None:
    """A new fp32 file of `shape`, its space reserved now: a full /dev/shm (a container's is often
    64 MB) raises OSError here instead of killing the process with SIGBUS at the first write."""
    with open(path, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, math.prod(shape) * 4)


def _map_populated(path: str, shape: tuple[int, ...]) -> mmap.mmap:
    """The file at `path` mapped shared and writable, its pages mapped in now (MAP_POPULATE where the
    OS has it), so reading it later takes no page faults."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(descriptor, math.prod(shape) * 4, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(descriptor)


class _Output:
    """One output file of `SharedLatents`, mapped once, and the result last handed out from it.

    Each result is a new tensor over the one mapping (`torch.frombuffer`: its own storage, no copy,
    no new page faults), so the weak reference to that storage says whether the result is still held.
    """

    def __init__(self, path: str, shape: tuple[int, ...]):
        _new_file(path, shape)
        self.path, self.shape = path, shape
        self._mapping = _map_populated(path, shape)
        self._handed: weakref.ref | None = None  # to the storage of the last result

    def free(self) -> bool:
        """Whether nothing holds the last result any more (not the tensor, a view of it, nor a numpy
        array over it), so rank 0 may write this file again. torch keeps a storage's Python object
        alive while any tensor uses the storage, so the weak reference dies exactly then
        (tests/test_shared_latent.py holds it to that)."""
        return self._handed is None or self._handed() is None

    def hand_out(self) -> torch.Tensor:
        """The file's content as a new fp32 tensor of `shape` (writable, valid as long as it is held)."""
        result = torch.frombuffer(self._mapping, dtype=torch.float32).view(self.shape)
        self._handed = weakref.ref(result.untyped_storage())
        return result


class SharedLatents:
    """Driver side: owns the folder and the buffers for one `Pool.evaluations` block.

    Usage: `files = shared.send(latent, output_shape)`, call the ranks with `files`, then
    `shared.receive()`; `close()` removes the files. A new shape gets new files (new names), so a rank
    never maps a file that changed size under it, and a rank maps each file once per block.

    `receive` hands out the output file itself (mapped once, no copy): a copy into a fresh 8 MiB
    tensor each evaluation cost more than the copy itself, and slowed the sampler's own arithmetic
    too (new allocations whose pages fault in again). Full-size Euler on one pool, both versions
    alternating: our part 5.2 -> 4.0 ms, the sampler's Euler update 6.7 -> 4.0 (another run 4.1 ->
    3.9) ms per evaluation (medians; README, measured 2026-12-02). The next evaluation writes into an output file whose last
    result nobody holds any more; while the sampler keeps results (its x0, a multistep sampler's
    previous x0s, a view of either), new files are added, so a result is never overwritten. A
    sampler's Euler loop uses two files.
    """

    def __init__(self):
        base = SHARED_MEMORY_DIR if os.path.isdir(SHARED_MEMORY_DIR) else None
        self.folder = tempfile.mkdtemp(prefix="mochi_xdit_latents_", dir=base)  # mode 0700
        self._input: torch.Tensor | None = None
        self._input_path = ""
        self._outputs: list[_Output] = []
        self._next: _Output | None = None  # the output file of the evaluation in flight
        self._made = 0

    def _path(self, name: str) -> str:
        self._made += 1
        return os.path.join(self.folder, f"{name}{self._made}")

    def _free_output(self, shape: tuple[int, ...]) -> _Output:
        """An output file of `shape` that rank 0 may write now: a free one, else a new one."""
        for output in self._outputs:
            if output.shape == shape and output.free():
                return output
        output = _Output(self._path("output"), shape)
        self._outputs.append(output)
        return output

    def send(self, latent: torch.Tensor, output_shape: tuple[int, ...]) -> SharedLatentFiles:
        """Write `latent` (any dtype and device; stored fp32) into the input buffer; returns the files.

        Raises:
            OSError: no room for new buffers (the caller sends through the object store instead).
        """
        shape, output_shape = tuple(latent.shape), tuple(output_shape)
        if self._input is None or tuple(self._input.shape) != shape:
            self._input_path = self._path("input")
            _new_file(self._input_path, shape)
            self._input = map_float32(self._input_path, shape)
        self._next = self._free_output(output_shape)
        self._input.copy_(latent.detach())
        return SharedLatentFiles(self._input_path, shape, self._next.path, output_shape)

    def receive(self) -> torch.Tensor:
        """What rank 0 wrote for the last `send`: the output file, mapped (writable; it stays the
        caller's, valid after `close()` too, until the caller drops it)."""
        output, self._next = self._next, None
        return output.hand_out()

    def close(self) -> None:
        """Remove the files (results handed out stay mapped, and readable, until dropped)."""
        self._input = self._next = None
        self._outputs = []
        shutil.rmtree(self.folder, ignore_errors=True)
