"""Where the DiT's block weights live on each rank: replicated, sharded across the ranks, or
streamed from host memory.

- `REPLICATED`: every rank holds every weight (the default when the model fits).
- `SHARDED`: each of the N ranks keeps 1/N of every block (PyTorch FSDP2, `fully_shard` over a
  1-D device mesh of the whole world, `reshard_after_forward=True`, no gradients). A block's full
  weights exist only while it runs, and the next block's all-gather is issued as this block starts
  (`set_modules_to_forward_prefetch`), so it overlaps this block's compute. FSDP2 serves as is: it
  swaps the gathered tensors into the module's own parameters for the forward, so our `Linear`
  (fp8 weight + scale buffer, a LoRA added at call time, GGUF bytes) computes unchanged; mixed
  dtypes in one block (fp8 weights, bf16 biases) travel as bytes. The embeddings and the final
  layer (~1 % of Mochi) stay replicated: the step cache and the guidance code call them outside
  `forward`. The whole world is one shard group, so every rank must run every block in lockstep:
  `needs_lockstep_calls` tells the sampler so (the idle CFG rank at a cfg-1 step evaluates anyway).
- `OFFLOAD`: the blocks' weights stay in (pinned) host memory and each block is copied to the GPU
  just before it runs, the next block prefetched on a side stream. On a CPU pool the weights are
  already in host memory, so it changes nothing (and the log says so).

The `auto` choice (fit with the planner's margin, else sharded, else offload) is made in
`workers/options.py`; this module only applies an explicit placement.
"""

import logging
from enum import Enum

import torch
import torch.distributed as dist
import torch.nn as nn

from .layers import LowRankUpdate

logger = logging.getLogger(__name__)

FORWARD_METHODS = ("attention_input_x",)  # block methods called outside `forward` (step cache indicator)
ROOT_METHODS = ("run_blocks", "first_block_modulated_input")  # model methods that run blocks outside `forward`


class WeightPlacement(str, Enum):
    """Where a rank keeps the DiT's block weights (see the module docstring)."""

    REPLICATED = "replicated"
    SHARDED = "sharded"
    OFFLOAD = "offload"

    @classmethod
    def parse(cls, value) -> "WeightPlacement":
        """The member for a member or its value name; raises ValueError listing the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise ValueError(f"weights={value!r} is not a weight placement; use one of {choices}") from None


def place_weights(model: nn.Module, placement: WeightPlacement, device: torch.device) -> str:
    """Apply a placement to a loaded MochiDiT (in place) and return a one-line note for the log.

    Args:
        model: MochiDiT loaded on `device` (replicated) or on the CPU (sharded, offload: the
            blocks move to the device one at a time, so a rank never holds the whole model there).
        placement: the WeightPlacement.
        device: this rank's compute device.

    Raises:
        ValueError: sharded without a process group of two or more ranks.
    """
    placement = WeightPlacement.parse(placement)
    device = torch.device(device)
    if placement is WeightPlacement.REPLICATED:
        model.to(device)
        return f"weights replicated: every rank holds the whole DiT ({_mib(local_weight_bytes(model))} MiB)"
    if placement is WeightPlacement.SHARDED:
        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise ValueError("weights='sharded' needs a pool of two or more ranks (each keeps 1/N of every block); "
                             "use 'offload' or 'replicated' on a single rank")
        shard_blocks(model, device)
        return (f"weights sharded over {dist.get_world_size()} ranks: this rank holds "
                f"{_mib(local_weight_bytes(model))} MiB of the DiT")
    _move_outside_blocks(model, device)
    if device.type != "cuda":
        return "weights='offload' on a CPU pool: the weights are already in host memory, nothing changes"
    BlockStreamer(model, device)
    return f"weights offloaded: blocks stream from pinned host memory ({_mib(local_weight_bytes(model))} MiB)"


def shard_blocks(model: nn.Module, device: torch.device) -> None:
    """FSDP2 over every block of `model.blocks`, one 1-D mesh of the whole default group.

    Each block is moved to `device` and split on its own, so at most one block is ever whole there.
    Everything outside the blocks moves to `device` unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = list(model.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
        for method in FORWARD_METHODS:
            register_fsdp_forward_method(block, method)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])  # gather block i+1 while block i computes
    _move_outside_blocks(model, device)
    # The model itself is the FSDP root (one root: the blocks share its streams, and the prefetch
    # chain works) but keeps its own weights whole: the step cache calls embed / head directly.
    outside = {param for name, param in model.named_parameters() if not name.startswith("blocks.")}
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=outside)
    for method in ROOT_METHODS:
        register_fsdp_forward_method(model, method)


def is_sharded(model: nn.Module) -> bool:
    """True when the model's blocks are FSDP-sharded (their forwards are collectives)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(block, FSDPModule) for block in getattr(model, "blocks", ()))


def needs_lockstep_calls(model: nn.Module) -> bool:
    """True when every rank must make the same DiT calls in the same order (sharded weights): a rank
    with nothing to evaluate must still run the blocks, or the others wait for its gathers."""
    return is_sharded(model)


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (a sharded tensor counts its local shard)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _move_outside_blocks(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside `model.blocks` to `device`."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for name, param in model.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device))


class BlockStreamer:
    """Keeps each block's parameters in host memory and copies them to `device` around its forward.

    A forward pre-hook makes the block's parameters device copies (waiting for a copy prefetched
    while the previous block ran, or copying now) and starts copying the next block on a side
    stream; the post-hook points the parameters back at the host tensors, so the device copies are
    freed. Small state (buffers such as fp8 scales, LoRA factors) moves to the device once.

    On CUDA the host tensors are pinned (asynchronous copies). The class also runs with a CPU
    `device` (synchronous copies), which is how the tests check the mechanics without a GPU.

    Args:
        model: MochiDiT with its blocks in host memory.
        device: where the blocks compute.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = torch.device(device)
        self.blocks = list(model.blocks)
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._host: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}  # block index -> (device copies, event)
        for index, block in enumerate(self.blocks):
            params = []
            for param in block.parameters():
                host = param.data.to("cpu")
                if cuda:
                    host = host.pin_memory()
                param.data = host
                params.append((param, host))
            self._host.append(params)
            for module in block.modules():
                for name, buffer in list(module.named_buffers(recurse=False)):
                    setattr(module, name, buffer.to(self.device))
            block.register_forward_pre_hook(self._make_pre_hook(index))
            block.register_forward_hook(self._make_post_hook(index))
            for method in FORWARD_METHODS:
                self._wrap_method(block, index, method)

    def _copy(self, index: int) -> tuple[list[torch.Tensor], object]:
        """Start copying block `index` to the device (on the side stream on CUDA)."""
        if self.copy_stream is None:
            return [host.to(self.device, copy=True) for _, host in self._host[index]], None
        with torch.cuda.stream(self.copy_stream):
            copies = [host.to(self.device, non_blocking=True) for _, host in self._host[index]]
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return copies, event

    def load(self, index: int) -> None:
        """Make block `index`'s parameters device tensors and prefetch the next block."""
        copies, event = self._pending.pop(index, None) or self._copy(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for copy in copies:
                copy.record_stream(current)  # made on the copy stream, used (and freed) on this one
        for (param, _), copy in zip(self._host[index], copies):
            param.data = copy
        for module in self.blocks[index].modules():
            low_rank = getattr(module, "low_rank", None)
            if low_rank is not None and low_rank.down.device != self.device:  # LoRAs are made beside the weights
                module.low_rank = LowRankUpdate(low_rank.down.to(self.device), low_rank.up.to(self.device))
        following = index + 1
        if following < len(self.blocks) and following not in self._pending:
            self._pending[following] = self._copy(following)

    def release(self, index: int) -> None:
        """Point block `index`'s parameters back at their host tensors (the device copies are freed)."""
        for param, host in self._host[index]:
            param.data = host

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            self.load(index)

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            self.release(index)

        return post_hook

    def _wrap_method(self, block: nn.Module, index: int, name: str) -> None:
        method = getattr(block, name)

        def resident(*args, **kwargs):
            self.load(index)
            try:
                return method(*args, **kwargs)
            finally:
                self.release(index)

        setattr(block, name, resident)
