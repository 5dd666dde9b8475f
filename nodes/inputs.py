"""Input declarations that several nodes share word for word (the pool and the two prompts, cfg),
so their tooltips and limits cannot drift apart."""

from .handle import POOL_TYPE

MAX_CFG = 100.0

POOL_INPUT = (POOL_TYPE, {"tooltip": "The rank pool from MochiXDiTLoader (or a LoRA loader after it)."})
POSITIVE_INPUT = ("CONDITIONING", {
    "tooltip": "What the video should show: CLIPTextEncode with a CLIPLoader of type 'mochi'."})
NEGATIVE_INPUT = ("CONDITIONING", {
    "tooltip": "What to steer away from (CLIPTextEncode; an empty prompt is usual). Unused when cfg is 1."})
CFG_INPUT = ("FLOAT", {
    "default": 4.5, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
    "tooltip": "Classifier-free guidance: higher follows the prompt more closely, too high over-saturates. "
               "4.5 is Mochi's default; 1 skips the negative pass (half the work; on a cfg_degree 2 pool "
               "the second half of the ranks then idles)."})
