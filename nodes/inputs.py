"""Link inputs that several nodes share word for word (the pool and the two prompts), so their
tooltips cannot drift apart. Widgets are declared in `workers/option_table.py`."""

from .handle import POOL_TYPE

POOL_INPUT = (POOL_TYPE, {"tooltip": "The rank pool from MochiXDiTLoader (or a LoRA loader after it)."})
POSITIVE_INPUT = ("CONDITIONING", {
    "tooltip": "What the video should show: CLIPTextEncode with a CLIPLoader of type 'mochi'."})
NEGATIVE_INPUT = ("CONDITIONING", {
    "tooltip": "What to steer away from (CLIPTextEncode; an empty prompt is usual). Unused when cfg is 1."})
