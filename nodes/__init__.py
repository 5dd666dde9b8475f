"""ComfyUI node classes. Modules here import ComfyUI (`comfy.*`, `folder_paths`) lazily, inside
methods, so that the package also imports where ComfyUI is absent (CLI, tests, Ray workers)."""

from .decode import MochiTiledVAEDecode
from .loader import MochiXDiTLoader
from .sampler import MochiXDiTSampler

NODE_CLASS_MAPPINGS = {
    "MochiXDiTLoader": MochiXDiTLoader,
    "MochiXDiTSampler": MochiXDiTSampler,
    "MochiTiledVAEDecode": MochiTiledVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MochiXDiTLoader": "Mochi xDiT Loader (multi-GPU pool)",
    "MochiXDiTSampler": "Mochi xDiT Sampler",
    "MochiTiledVAEDecode": "Mochi xDiT Tiled VAE Decode",
}
