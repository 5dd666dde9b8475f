"""Text conditioning as the DiT consumes it: T5 features plus the valid-token mask.

Plain tensors, no ComfyUI types: the nodes turn a CONDITIONING into this, the CLI builds it from
its own T5 run. Padded positions may hold anything; only mask == 1 tokens are used.
"""

from dataclasses import dataclass

import torch

from .constants import T5_DIM


@dataclass(frozen=True)
class TextCondition:
    """One prompt's encoding.

    Args:
        features: [1, L, D] float T5 features, D = 4096 for Mochi's T5-XXL (tiny test models use
            less; the sampler checks D against the model); L = 256 for ComfyUI's padded prompts.
        mask: [1, L] integer or bool, 1 for valid tokens (EOS included), 0 for padding; an empty
            prompt may have no valid token at all.
    """

    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        features, mask = self.features, self.mask
        if not isinstance(features, torch.Tensor) or not isinstance(mask, torch.Tensor):
            raise TypeError("TextCondition needs torch tensors for features and mask")
        if features.dim() != 3 or features.shape[0] != 1 or features.shape[2] < 1:
            raise ValueError(
                f"text features must be [1, L, {T5_DIM}] (one prompt, T5-XXL width), got "
                f"{tuple(features.shape)}; encode each prompt with Mochi's T5-XXL encoder separately"
            )
        if not features.is_floating_point():
            raise ValueError(f"text features must be floating point, got {features.dtype}")
        if mask.shape != features.shape[:2]:
            raise ValueError(
                f"text mask shape {tuple(mask.shape)} does not match the features' [1, L] = "
                f"{tuple(features.shape[:2])}; pass the attention_mask that came with these features"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"text mask must be integer or bool (1 = valid token), got {mask.dtype}")
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("text mask must contain only 0 (padding) and 1 (valid token)")

    @property
    def num_valid_tokens(self) -> int:
        return int(self.mask.sum().item())

    @classmethod
    def empty(cls, length: int = 256, dim: int = T5_DIM) -> "TextCondition":
        """An encoding with no valid token at all."""
        return cls(torch.zeros(1, length, dim), torch.zeros(1, length, dtype=torch.int64))
