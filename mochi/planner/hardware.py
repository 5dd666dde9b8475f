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
        memory_gb: device memory, GB (decimal).
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

GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("H100", 989.0, 80.0, 450.0, PCIE5),
        GPU("H200", 989.0, 141.0, 450.0, PCIE5),
        GPU("H20", 148.0, 96.0, 450.0, PCIE5),
        GPU("A100-80", 312.0, 80.0, 300.0, PCIE4),
        GPU("A100-40", 312.0, 40.0, 300.0, PCIE4),
        GPU("L40", 181.0, 48.0, None, PCIE4),
        GPU("L40S", 362.0, 48.0, None, PCIE4),
        GPU("L20", 119.5, 48.0, None, PCIE4),
        GPU("RTX4090", 165.0, 24.0, None, PCIE4),
    )
}
_ALIASES = {"A100": "A100-80", "4090": "RTX4090", "RTX-4090": "RTX4090", "RTX 4090": "RTX4090"}

LINK_CLASSES = ("nvlink", "pcie", "ethernet")


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
