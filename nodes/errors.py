"""Turning the pool's typed failures into messages a ComfyUI user can act on.

The kind of a failure is decided in `workers/failures.py` from exception types; here each kind
gets its advice. Nothing reads a message to decide anything.
"""

import torch

OOM_ADVICE = (
    "Give the pool more ranks (world_size, with ulysses/ring degrees), use weight_dtype fp8, a smaller "
    "video (fewer frames or pixels), or smaller decode tiles."
)


class user_errors:
    """Context manager: PoolError -> RuntimeError (MemoryError for out of memory) with advice;
    refusals made before anything ran (capacity, a Ray address) -> ValueError naming the fix."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None:
            return False
        from ..workers.capacity import CapacityError
        from ..workers.failures import FailureKind, PoolError
        from ..workers.ray_runtime import RayAddressError

        if isinstance(error, torch.OutOfMemoryError) or (
                isinstance(error, PoolError) and error.kind is FailureKind.OUT_OF_MEMORY):
            raise MemoryError(f"Mochi xDiT: out of memory: {error}\n{OOM_ADVICE}") from error
        if isinstance(error, PoolError):
            hint = f"\nIf that rank ran out of memory: {OOM_ADVICE}" if error.kind is FailureKind.RANK_DIED else ""
            raise RuntimeError(f"Mochi xDiT pool: {error}{hint}") from error
        if isinstance(error, (CapacityError, RayAddressError)):
            raise ValueError(f"Mochi xDiT: {error}") from error
        return False
