"""Learning from ComfyUI that it freed memory, so the pool's ranks free theirs too.

"Unload Models" in the UI and `POST /free` set a flag that ComfyUI's prompt worker turns into one
call, `comfy.model_management.unload_all_models()` (main.py; execution.py also calls it after an
out-of-memory error in ComfyUI itself and, with --disable-smart-memory, after every prompt). That
function is the least fragile place to learn of it: it is the one entry point for "free everything"
in every path, looked up on the module at each call. Alternatives were worse: a fake entry in
`current_loaded_models` needs a ModelPatcher and would be unloaded whenever ComfyUI wants room for
its own models; reading the queue's flags races with the worker that consumes them. We wrap the
function (once, idempotently) to stop the live pool after ComfyUI has unloaded its own models; the
next prompt rebuilds the pool from the handle's spec.
"""

import functools
import logging

logger = logging.getLogger("mochi_xdit")
RELEASE_REASON = "ComfyUI unloaded its models (Unload Models / POST /free)"


def release_pool_memory() -> bool:
    """Stop the live pool so every rank frees its memory; returns whether one was running."""
    from ..workers.service import default_service

    return default_service().release_pool(RELEASE_REASON)


def install_free_memory_hook() -> bool:
    """Wrap `comfy.model_management.unload_all_models` to also release the pool; True when installed
    (False outside ComfyUI)."""
    try:
        import comfy.model_management as management
    except ImportError:
        return False
    original = getattr(management, "unload_all_models", None)
    if original is None:
        return False
    if getattr(original, "mochi_xdit_releases_pool", False):
        return True

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            release_pool_memory()
        except Exception:  # ComfyUI's own unload already happened; say why ours did not
            logger.exception("Mochi xDiT: stopping the pool after ComfyUI freed memory failed")
        return result

    unload_all_models.mochi_xdit_releases_pool = True
    management.unload_all_models = unload_all_models
    return True
