"""MochiXDiTModelSampling: ComfyUI's Mochi model sampling as a MODEL, for the custom-sampling nodes
that read only the model's sigmas (BasicScheduler, BetaSamplingScheduler, SamplingPercentToSigma,
SamplerSASolver) next to MochiXDiTGuider. The weights live on the rank pool, not in this MODEL."""


class MochiXDiTModelSampling:
    DESCRIPTION = (
        "Mochi's model sampling (flow, shift 6, as ComfyUI's own Mochi model) for scheduler nodes such as "
        "BasicScheduler when the model runs on the Mochi xDiT pool. It holds no weights: sampling with it "
        "goes through MochiXDiTGuider; KSampler or SamplerCustom cannot run it."
    )
    CATEGORY = "Mochi xDiT"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model_sampling",)
    OUTPUT_TOOLTIPS = ("Connect to BasicScheduler (or another node that only reads the model's sigmas).",)
    FUNCTION = "get_model"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def get_model(self):
        from .comfy_sampling import mochi_model_patcher  # imports ComfyUI

        return (mochi_model_patcher(),)
