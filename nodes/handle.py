"""The MOCHI_XDIT_POOL type: what flows from the loader to the sampler and the decoder.

The handle carries the pool's spec, not the pool: ComfyUI caches the loader's output across
prompts, while the pool behind it may be rebuilt (after a rank died, after ComfyUI freed memory,
or when another loader asked for other files). Every run looks the pool up again through the
process's `MochiService`; an unchanged spec reuses the live pool.
"""

from dataclasses import dataclass

POOL_TYPE = "MOCHI_XDIT_POOL"


@dataclass(frozen=True)
class PoolHandle:
    """What flows along a MOCHI_XDIT_POOL link.

    Args:
        spec: the resolved `workers.protocol.PoolSpec` (files, dtype, degrees, device, Ray address).
        loras: the `mochi.lora.LoraSpec`s the sampler runs with (MochiXDiTLoraLoader adds them); they
            do not change the pool, only what its ranks apply for a run.
    """

    spec: object
    loras: tuple = ()

    def with_lora(self, lora) -> "PoolHandle":
        return PoolHandle(self.spec, self.loras + (lora,))

    def __repr__(self):
        spec = self.spec
        loras = f", {len(self.loras)} LoRA(s)" if self.loras else ""
        return f"MochiXDiTPool({spec.parallel}, {spec.weight_dtype}, {spec.device}{loras})"


def pool_for(handle: PoolHandle):
    """The live pool for this handle (reused, or rebuilt with the reason logged)."""
    from ..workers.service import default_service

    return default_service().pool(handle.spec)
