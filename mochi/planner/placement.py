"""What each weight placement costs one rank: resident DiT bytes and weight traffic per step.

Counted from a meta-device model (nothing allocated), in the stored dtype:
    replicated  resident = the whole DiT;                     moved = 0
    sharded     resident = outside + blocks / N + 3 blocks;    moved = calls x (N-1)/N x blocks (all-gather sends)
    offload     resident = outside + 2 blocks;                 moved = calls x blocks (host -> GPU copies)
"outside" is everything not in a block (embeddings, T5 pool, final layer: ~1 % of Mochi), kept whole
on every rank. Sharded holds the running block, the next block's all-gather output and its copy
into the parameters (FSDP2 copies out) at once; offload the running block and the prefetched one.
"calls" is the DiT forwards a rank makes per step: 2 with CFG on one rank, else 1 (under a CFG
split each rank runs one branch; sharded ranks run it in lockstep even at cfg-1 steps).

Moving a block overlaps the previous block's compute, so only the excess is exposed:
    exposed = calls x depth x max(0, block move time - block compute time)
with block compute time = the step's compute bound / (calls x depth). The gather shares the link
with Ulysses all-to-alls, which this does not model.
"""

import math
from dataclasses import dataclass

import torch

from ..checkpoint import CheckpointInfo
from ..dit import DiTConfig, MochiDiT
from ..gguf_linear import GGUFQuant
from ..layers import Linear
from ..weight_placement import WeightPlacement
from .hardware import GB

HOST_COPY_GBPS = 25.0  # pinned host -> GPU over PCIe 4.0 x16 (32 GB/s in theory, ~25 in practice)
SHARDED_BLOCK_BUFFERS = 3  # the running block, the next one's all-gather output and its copy-out
OFFLOAD_BLOCK_BUFFERS = 2  # the running block and the prefetched one


@dataclass(frozen=True)
class WeightSplit:
    """A DiT's stored bytes: all blocks, the largest block, and everything outside the blocks."""

    block_bytes: int
    largest_block_bytes: int
    outside_bytes: int
    depth: int

    @property
    def total_bytes(self) -> int:
        return self.block_bytes + self.outside_bytes


def _stored_bytes(module: torch.nn.Module, weight_dtype: str) -> int:
    """bf16 everywhere, or fp8 Linear weights (1 byte + a fp32 scale each), as `simulate.weight_bytes`."""
    total = 0
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if weight_dtype == "fp8" and isinstance(submodule, Linear) and name == "weight":
                total += param.numel() + 4
            else:
                total += param.numel() * 2
    return total


def weight_split(config: DiTConfig, weight_dtype: str) -> WeightSplit:
    """Stored bytes by part for a DiT of this size ("bf16" or "fp8")."""
    with torch.device("meta"):
        model = MochiDiT(config)
    blocks = [_stored_bytes(block, weight_dtype) for block in model.blocks]
    return WeightSplit(sum(blocks), max(blocks), _stored_bytes(model, weight_dtype) - sum(blocks), len(blocks))


def quantised_weight_split(info: CheckpointInfo, depth: int) -> WeightSplit:
    """Stored bytes by part of a GGUF DiT file as a rank holds it: Linear weights of a GGUFQuant type
    as their quantised bytes (`gguf_checkpoint.load_quantised_into` keeps them so), every other
    tensor in bf16 (dequantised or cast at load; the few fp32 ones are noise here)."""
    blocks = [0] * depth
    outside = 0
    for name, key in info.dit_names().items():
        tensor = info.tensors[key]
        try:
            quant = GGUFQuant(tensor.dtype)
        except ValueError:
            quant = None
        if quant is not None and len(tensor.shape) == 2:
            nbytes = tensor.shape[0] * quant.row_bytes(tensor.shape[1])
        else:
            nbytes = math.prod(tensor.shape) * 2
        if name.startswith("blocks."):
            blocks[int(name.split(".")[1])] += nbytes
        else:
            outside += nbytes
    return WeightSplit(sum(blocks), max(blocks), outside, depth)


@dataclass(frozen=True)
class PlacedWeights:
    """One rank's DiT weights under a placement.

    Attributes:
        placement: the WeightPlacement.
        resident_bytes: DiT weight bytes on the GPU at the step's peak.
        moved_bytes: per step: bytes the rank sends in all-gathers (sharded) or copies from host
            memory (offload); 0 replicated.
        move_s: moved_bytes over the bandwidth used (the ranks' link, or the host copy link).
        exposed_s: the part of move_s that does not hide behind block compute.
    """

    placement: WeightPlacement
    resident_bytes: int
    moved_bytes: int
    move_s: float
    exposed_s: float


def dit_calls_per_step(cfg_degree: int, use_cfg: bool) -> int:
    """DiT forwards one rank makes per step."""
    return 2 if use_cfg and cfg_degree == 1 else 1


def place(split: WeightSplit, placement: WeightPlacement, world_size: int, calls: int, compute_s: float,
          link_gbps: float, host_gbps: float = HOST_COPY_GBPS) -> PlacedWeights:
    """Resident bytes and traffic of one placement (see the module docstring).

    Args:
        split: the DiT's bytes by part.
        placement: the WeightPlacement (sharded needs world_size >= 2).
        world_size: ranks (the shard group is the whole world).
        calls: DiT forwards per rank per step (`dit_calls_per_step`).
        compute_s: the step's compute bound on this rank, s.
        link_gbps: the ranks' link, GB/s per direction (all-gathers).
        host_gbps: host -> GPU copy bandwidth, GB/s (offload).
    """
    placement = WeightPlacement.parse(placement)
    if placement is WeightPlacement.REPLICATED:
        return PlacedWeights(placement, split.total_bytes, 0, 0.0, 0.0)
    block_compute_s = compute_s / (calls * split.depth)
    if placement is WeightPlacement.SHARDED:
        if world_size < 2:
            raise ValueError("sharded weights need two or more ranks; use offload on one GPU")
        shard = -(-split.block_bytes // world_size)  # ceil: FSDP pads each tensor to a multiple of N rows
        resident = split.outside_bytes + shard + SHARDED_BLOCK_BUFFERS * split.largest_block_bytes
        per_block = (world_size - 1) / world_size * split.largest_block_bytes / (link_gbps * GB)
        moved = calls * (world_size - 1) * split.block_bytes // world_size
        bandwidth = link_gbps
    else:
        resident = split.outside_bytes + OFFLOAD_BLOCK_BUFFERS * split.largest_block_bytes
        per_block = split.largest_block_bytes / (host_gbps * GB)
        moved = calls * split.block_bytes
        bandwidth = host_gbps
    exposed = calls * split.depth * max(0.0, per_block - block_compute_s)
    return PlacedWeights(placement, resident, moved, moved / (bandwidth * GB), exposed)
