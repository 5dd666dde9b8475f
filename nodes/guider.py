"""MochiXDiTGuider: the rank pool as a GUIDER, for SamplerCustomAdvanced and ComfyUI's custom
sampling nodes (KSamplerSelect, BasicScheduler, SplitSigmas, RandomNoise, ...)."""

from ..workers.option_table import Door, node_inputs, widget_problem
from . import checks
from .comfy_types import conditioning_to_text
from .inputs import NEGATIVE_INPUT, POOL_INPUT, POSITIVE_INPUT


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
                "pool": POOL_INPUT,
                "positive": POSITIVE_INPUT,
                "negative": NEGATIVE_INPUT,
                **node_inputs(Door.GUIDER)["required"],
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, cfg):
        return checks.refuse(widget_problem(Door.GUIDER, {"cfg": cfg}))

    def get_guider(self, pool, positive, negative, cfg):
        from .comfy_sampling import PoolGuider  # imports ComfyUI

        problem = widget_problem(Door.GUIDER, {"cfg": cfg}) or (None if cfg is not None else "cfg is missing")
        if problem:
            raise ValueError(problem)
        guider = PoolGuider(pool, conditioning_to_text(positive, "positive"), conditioning_to_text(negative, "negative"))
        guider.set_cfg(cfg)
        return (guider,)
