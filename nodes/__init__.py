"""ComfyUI node classes. Modules here import ComfyUI (`comfy.*`, `folder_paths`) lazily, inside
methods, so that the package also imports where ComfyUI is absent (CLI, tests, Ray workers)."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
