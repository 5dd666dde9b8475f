"""ComfyUI node classes. Modules here import ComfyUI (`comfy.*`, `folder_paths`) lazily, inside
methods; importing this package (only ComfyUI and tests do) also hooks ComfyUI's "free memory"
so the pool's ranks release theirs (`comfy_hooks`)."""

from .comfy_hooks import install_free_memory_hook
from .decode import MochiTiledVAEDecode
from .encode import MochiTiledVAEEncode
from .guider import MochiXDiTGuider
from .loader import MochiXDiTLoader
from .lora_loader import MochiXDiTLoraLoader
from .model_sampling import MochiXDiTModelSampling
from .sampler import MochiXDiTSampler

NODE_CLASS_MAPPINGS = {
    "MochiXDiTLoader": MochiXDiTLoader,
    "MochiXDiTSampler": MochiXDiTSampler,
    "MochiTiledVAEDecode": MochiTiledVAEDecode,
    "MochiXDiTLoraLoader": MochiXDiTLoraLoader,
    "MochiXDiTGuider": MochiXDiTGuider,
    "MochiXDiTModelSampling": MochiXDiTModelSampling,
    "MochiTiledVAEEncode": MochiTiledVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MochiXDiTLoader": "Mochi xDiT Loader (multi-GPU pool)",
    "MochiXDiTSampler": "Mochi xDiT Sampler",
    "MochiTiledVAEDecode": "Mochi xDiT Tiled VAE Decode",
    "MochiXDiTLoraLoader": "Mochi xDiT LoRA Loader",
    "MochiXDiTGuider": "Mochi xDiT Guider (for SamplerCustomAdvanced)",
    "MochiXDiTModelSampling": "Mochi xDiT Model Sampling (for scheduler nodes)",
    "MochiTiledVAEEncode": "Mochi xDiT Tiled VAE Encode",
}

install_free_memory_hook()
