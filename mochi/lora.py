"""Mochi LoRAs on a rank: load a LoRA file's tensors fitted to one DiT and apply them as call-time
low-rank additions (`layers.LowRankUpdate`) that can be removed exactly. What a file holds and
whether it fits is `lora_files.py`'s (header only, driver side).

Entry points: `load_lora` (tensors, fitted to one model), `apply_loras` / `clear_loras` (set /
remove the call-time additions on a DiT) and `LoraSwitch` (what a rank holds: applies a tuple of
specs, a no-op when nothing changed).

Sequence parallelism shards video tokens only; every rank holds every weight and the LoRA acts on
each token independently (a Linear), so the LoRA's contribution is the same on every rank.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layers import Linear, LowRankUpdate
from .lora_files import (LoraError, LoraInfo, LoraProblem, LoraSpec, fit_lora, linear_shapes, read_lora_header,
                         warn_ignored)


# -- loading and applying ----------------------------------------------------------------------

@dataclass(frozen=True)
class LoraDelta:
    """One pair's tensors, ready to add: delta W[row_start : row_start + rows] = up @ down.

    Args:
        module: our Linear.
        row_start: first output row it writes.
        down: [rank, in] fp32.
        up: [rows, rank] fp32, times alpha / rank, rows in our order.
    """

    module: str
    row_start: int
    down: torch.Tensor
    up: torch.Tensor


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file loaded for one model: its header description and its deltas (fp32, CPU)."""

    info: LoraInfo
    deltas: tuple[LoraDelta, ...]


def load_lora(path: str | os.PathLike, model: torch.nn.Module) -> LoraWeights:
    """Read a LoRA file and fit it to `model` (a MochiDiT): header checks as `inspect_lora`, shape
    checks against the model's layers, tensors read as fp32 with alpha / rank folded into B.

    Raises:
        LoraError, as inspect_lora and fit_lora.
    """
    from safetensors import safe_open

    info = fit_lora(read_lora_header(path), linear_shapes(model))
    if info.ignored:
        warn_ignored(info)
    deltas = []
    try:
        with safe_open(info.path, framework="pt", device="cpu") as f:
            for pair in info.pairs:
                down = f.get_tensor(pair.down_key).float()  # [r, in]
                up = f.get_tensor(pair.up_key).float() * pair.scale  # [rows, r]
                if pair.swap_halves:
                    first, second = up.chunk(2, dim=0)
                    up = torch.cat([second, first], dim=0)
                deltas.append(LoraDelta(pair.module, pair.row_start, down.contiguous(), up.contiguous()))
    except (OSError, RuntimeError) as error:  # safetensors raises these for unreadable data
        raise LoraError(LoraProblem.BAD_FILE, f"{info.path} could not be read ({error}); download or copy the "
                        "file again") from None
    return LoraWeights(info, tuple(deltas))


def clear_loras(model: torch.nn.Module) -> None:
    """Remove every LoRA from the model: each Linear computes its base weights only, exactly as
    before any LoRA (the base weights were never changed)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.low_rank = None


def apply_loras(model: torch.nn.Module, loras: Sequence[tuple[LoraWeights, float]],
                dtype: torch.dtype = torch.float32) -> None:
    """Make exactly these LoRAs active on the model (replacing any before): for every Linear they
    touch, y = base(x) + sum_k strength_k * scale_k * (x @ A_k^T) @ B_k^T at call time.

    Args:
        model: a MochiDiT (any size; the LoRAs were loaded for it with `load_lora`).
        loras: (weights, strength) pairs; an empty sequence is `clear_loras`.
        dtype: the activation dtype the model runs in (fp32 on CPU, bf16 on GPU); the low-rank
            factors are stored in it, on each layer's device.
    """
    modules = dict(model.named_modules())
    per_module: dict[str, list[tuple[LoraDelta, float]]] = {}
    for weights, strength in loras:
        for delta in weights.deltas:
            layer = modules.get(delta.module)
            if not isinstance(layer, Linear) or delta.down.shape[1] != layer.in_features \
                    or delta.row_start + delta.up.shape[0] > layer.out_features:
                raise LoraError(LoraProblem.SHAPE_MISMATCH, f"{weights.info.path} was loaded for another model "
                                f"({delta.module} does not fit); load it with load_lora(path, this model)")
            per_module.setdefault(delta.module, []).append((delta, float(strength)))
    updates = {}
    for name, parts in per_module.items():
        layer = modules[name]
        device = layer.weight.device
        down = torch.cat([delta.down for delta, _ in parts], dim=0)  # [R, in]
        up = torch.zeros(layer.out_features, down.shape[0])  # [out, R]
        column = 0
        for delta, strength in parts:
            rows, rank = delta.up.shape
            up[delta.row_start: delta.row_start + rows, column: column + rank] = delta.up * strength
            column += rank
        updates[name] = LowRankUpdate(down.to(device, dtype), up.to(device, dtype))
    clear_loras(model)
    for name, update in updates.items():
        modules[name].low_rank = update


class LoraSwitch:
    """The LoRAs active on one DiT, switched by a tuple of LoraSpecs (one per rank).

    `set(specs)` loads what is new, applies exactly those LoRAs and is a no-op when the same files
    (same mtimes and sizes) with the same strengths are already active. Loaded files stay cached
    while they are in use, so changing only a strength re-reads nothing.

    Args:
        model: the MochiDiT.
        dtype: its activation dtype (see apply_loras).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self._key: tuple = ()
        self._files: dict[tuple, LoraWeights] = {}

    @staticmethod
    def _file_key(spec: LoraSpec) -> tuple:
        try:
            stat = os.stat(spec.path)
        except OSError:
            raise LoraError(LoraProblem.NOT_FOUND, f"LoRA file {spec.path} does not exist on this machine; check the "
                            "path (every rank reads it itself)") from None
        return spec.path, stat.st_mtime_ns, stat.st_size

    def set(self, specs: Sequence[LoraSpec]) -> bool:
        """Make exactly `specs` active; returns False when they already were (nothing done)."""
        file_keys = [self._file_key(spec) for spec in specs]
        key = tuple((file_key, spec.strength) for file_key, spec in zip(file_keys, specs))
        if key == self._key:
            return False
        files = {k: self._files.get(k) or load_lora(spec.path, self.model) for k, spec in zip(file_keys, specs)}
        apply_loras(self.model, [(files[k], spec.strength) for k, spec in zip(file_keys, specs)], self.dtype)
        self._files, self._key = files, key
        return True

    @property
    def active(self) -> tuple:
        """((path, mtime_ns, size), strength) per active LoRA, in order; () for the base model."""
        return self._key
