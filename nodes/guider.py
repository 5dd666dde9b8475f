"""MochiXDiTGuider: the rank pool as a GUIDER, for SamplerCustomAdvanced and ComfyUI's custom
sampling nodes (KSamplerSelect, BasicScheduler, SplitSigmas, RandomNoise, ...)."""

from . import checks
from .comfy_types import conditioning_to_text
from .handle import POOL_TYPE

MAX_CFG = 100.0


class MochiXDiTGuider:
    DESCRIPTION = (
        "Makes the Mochi xDiT rank pool a GUIDER: SamplerCustomAdvanced then runs any ComfyUI sampler, "
        "sigmas and noise with every model evaluation done in lockstep on all ranks (CFG on the ranks)."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's guider input.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pool": (POOL_TYPE, {"tooltip": "The rank pool from MochiXDiTLoader."}),
                "positive": ("CONDITIONING", {
                    "tooltip": "What the video should show: CLIPTextEncode with a CLIPLoader of type 'mochi'."}),
                "negative": ("CONDITIONING", {
                    "tooltip": "What to steer away from (CLIPTextEncode). Unused when cfg is 1."}),
                "cfg": ("FLOAT", {
                    "default": 4.5, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                    "tooltip": "Classifier-free guidance: higher follows the prompt more closely, too high "
                               "over-saturates. 4.5 is Mochi's default; 1 skips the negative pass (half "
                               "the work)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, cfg):
        return checks.refuse(checks.float_problem("cfg", cfg, 0.0, MAX_CFG) if cfg is not None else None)

    def get_guider(self, pool, positive, negative, cfg):
        from .comfy_sampling import PoolGuider  # imports ComfyUI

        problem = checks.float_problem("cfg", cfg, 0.0, MAX_CFG)
        if problem:
            raise ValueError(problem)
        guider = PoolGuider(pool, conditioning_to_text(positive, "positive"), conditioning_to_text(negative, "negative"))
        guider.set_cfg(cfg)
        return (guider,)
