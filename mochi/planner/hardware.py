"""GPUs and links the planner knows: peak dense bf16 throughput, memory, and link bandwidth.

Figures are vendors' datasheet numbers (dense, i.e. without 2:4 sparsity; SXM variants where a GPU
has several). Link bandwidths are per GPU and per direction, which is what bounds an all-to-all or a
ring exchange: NVLink 4 (H100/H200/H20) 450 GB/s, NVLink 3 (A100) 300 GB/s, PCIe 5.0 x16 64 GB/s,
PCIe 4.0 x16 32 GB/s, and "ethernet" as a 100 Gb/s NIC (12.5 GB/s). Give a number of GB/s for
anything else (e.g. 50 for a 400 Gb/s InfiniBand port).
"""

from dataclasses import dataclass

GB = 1e9  # the planner prints decimal GB, as GPU datasheets do


@dataclass(frozen=True)
class GPU:
    """One GPU model.

    Args:
        name: the name users type ("H100", "A100-80", ...).
        bf16_tflops: peak dense bf16 tensor throughput, TFLOP/s.
        memory_gb: total device memory in decimal GB, as torch reports it (a "24 GB" RTX 4090 has
            24564 MiB = 25.8 GB; the planner compares counted bytes against this).
        nvlink_gbps: NVLink bandwidth per direction, GB/s, or None when the GPU has no NVLink.
        pcie_gbps: PCIe x16 bandwidth per direction, GB/s.
    """

    name: str
    bf16_tflops: float
    memory_gb: float
    nvlink_gbps: float | None
    pcie_gbps: float

    def __post_init__(self):
        if self.bf16_tflops <= 0 or self.memory_gb <= 0 or self.pcie_gbps <= 0:
            raise ValueError(f"GPU {self.name}: throughput, memory and PCIe bandwidth must be positive")


PCIE4 = 32.0
PCIE5 = 64.0
ETHERNET_GBPS = 12.5  # 100 Gb/s

MIB = 2**20

GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        # memory: the total torch / nvidia-smi report (MiB), in decimal GB; "80GB" cards hold ~85 GB.
        GPU("H100", 989.0, 81559 * MIB / GB, 450.0, PCIE5),
        GPU("H200", 989.0, 143771 * MIB / GB, 450.0, PCIE5),
        GPU("H20", 148.0, 97871 * MIB / GB, 450.0, PCIE5),
        GPU("A100-80", 312.0, 81920 * MIB / GB, 300.0, PCIE4),
        GPU("A100-40", 312.0, 40960 * MIB / GB, 300.0, PCIE4),
        GPU("L40", 181.0, 46068 * MIB / GB, None, PCIE4),
        GPU("L40S", 362.0, 46068 * MIB / GB, None, PCIE4),
        GPU("L20", 119.5, 46068 * MIB / GB, None, PCIE4),
        GPU("RTX4090", 165.0, 24564 * MIB / GB, None, PCIE4),
        GPU("RTX4080", 97.5, 16376 * MIB / GB, None, PCIE4),  # the 16 GB card class (4060 Ti 16 GB, 4070 Ti S, 4080)
    )
}
_ALIASES = {"A100": "A100-80", "4090": "RTX4090", "RTX-4090": "RTX4090", "RTX 4090": "RTX4090"}

LINK_CLASSES = ("nvlink", "pcie", "ethernet")


def gpu_with_memory(memory_gb: float, base: GPU | None = None) -> GPU:
    """A card with `memory_gb` GB as sold (16, 24: binary GB, ~1024 MiB each, which torch reports as
    17.2 and 25.8 decimal GB): `base` with that memory, or a stand-in (UNKNOWN_GPU_TFLOPS, PCIe 4,
    no NVLink) when no base is given."""
    if not memory_gb > 0:
        raise ValueError(f"GPU memory must be a positive number of GB, got {memory_gb}")
    memory = memory_gb * 1024 * MIB / GB
    if base is None:
        return GPU(f"{memory_gb:g} GB GPU", UNKNOWN_GPU_TFLOPS, memory, None, PCIE4)
    return GPU(f"{base.name} ({memory_gb:g} GB)", base.bf16_tflops, memory, base.nvlink_gbps, base.pcie_gbps)


def get_gpu(name: str) -> GPU:
    """Look a GPU up by name (case-insensitive; "A100" means the 80 GB card)."""
    key = name.strip().upper().replace("_", "-")
    key = _ALIASES.get(key, key)
    for gpu_name, gpu in GPUS.items():
        if gpu_name.upper() == key:
            return gpu
    raise ValueError(f"unknown GPU {name!r}; use one of {', '.join(GPUS)} (or A100 for the 80 GB A100)")


def link_bandwidth(link: str | float, gpu: GPU) -> float:
    """Per-direction bandwidth in GB/s between the ranks of one group.

    Args:
        link: "nvlink", "pcie", "ethernet", or a number of GB/s.
        gpu: the GPU (its NVLink and PCIe generation set the first two).
    """
    if isinstance(link, (int, float)) and not isinstance(link, bool):
        if link <= 0:
            raise ValueError(f"link bandwidth must be positive GB/s, got {link}")
        return float(link)
    name = str(link).strip().lower()
    try:
        return float(name)  # "25" from a command line
    except ValueError:
        pass
    if name == "nvlink":
        if gpu.nvlink_gbps is None:
            raise ValueError(f"{gpu.name} has no NVLink; use link 'pcie' (or a GB/s number)")
        return gpu.nvlink_gbps
    if name == "pcie":
        return gpu.pcie_gbps
    if name == "ethernet":
        return ETHERNET_GBPS
    raise ValueError(f"unknown link {link!r}; use one of {', '.join(LINK_CLASSES)} or a number of GB/s")


# Substrings of torch.cuda.get_device_name() per table entry, most specific first.
_DEVICE_NAME_KEYS = (
    ("H200", "H200"), ("H100", "H100"), ("H800", "H100"), ("H20", "H20"), ("L40S", "L40S"), ("L40", "L40"),
    ("L20", "L20"), ("RTX 4090", "RTX4090"), ("A100", "A100"),
)
UNKNOWN_GPU_TFLOPS = 100.0  # a deliberately modest guess for GPUs not in the table


def gpu_from_device_name(device_name: str, memory_bytes: int | None = None) -> GPU:
    """The table entry for a CUDA device name such as "NVIDIA H100 80GB HBM3" (what
    `torch.cuda.get_device_name()` returns), so `auto` can plan for the GPUs it actually has.

    Args:
        device_name: the device's name.
        memory_bytes: `torch.cuda.get_device_properties(i).total_memory`; picks the A100 size, and
            for a GPU not in the table gives the memory of a stand-in entry (100 TFLOP/s, PCIe 4,
            no NVLink) so planning still works.
    """
    upper = device_name.upper()
    for key, name in _DEVICE_NAME_KEYS:
        if key in upper:
            if name == "A100":
                small = "40GB" in upper.replace(" ", "") or (memory_bytes is not None and memory_bytes < 60 * GB)
                name = "A100-40" if small else "A100-80"
            return GPUS[name]
    if memory_bytes is None:
        raise ValueError(
            f"GPU {device_name!r} is not in the planner's table ({', '.join(GPUS)}); pass memory_bytes "
            "(torch.cuda.get_device_properties(i).total_memory) to plan with a stand-in entry"
        )
    return GPU(device_name, UNKNOWN_GPU_TFLOPS, memory_bytes / GB, None, PCIE4)
