"""ComfyUI's progress bar, latent previews and Cancel for one sampling run on the pool."""

from .comfy_types import DEFAULT_PREVIEW_SIZE, preview_image


class ProgressReporter:
    """ComfyUI's progress bar for one sampling run; create it inside the node's method (the bar
    captures ComfyUI's hook, which knows the running node, at creation).

    `__call__(report)` is the pool's per-step callback. When the user pressed Cancel it raises
    ComfyUI's InterruptProcessingException (so does the bar's hook, an interruption point); the
    pool then cancels the run on every rank and re-raises it, and ComfyUI reports the node as
    interrupted. Rank 0's preview arrives in model space; `preview_image` turns it into RGB.
    """

    def __init__(self, steps: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(steps)
        self.wants_preview = previews_enabled()

    def __call__(self, report) -> bool:
        import comfy.model_management as management

        management.throw_exception_if_processing_interrupted()
        preview = preview_image(report.preview, preview_size()) if report.preview is not None else None
        self.bar.update_absolute(report.index + 1, report.total, preview)
        return True


def previews_enabled() -> bool:
    """ComfyUI's --preview-method (default none): previews cost a little time each step."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    method = getattr(args.preview_method, "value", args.preview_method)
    return str(method) != "none"


def preview_size() -> int:
    """ComfyUI's --preview-size."""
    try:
        from comfy.cli_args import args
    except ImportError:  # ComfyUI absent (tests): its default
        return DEFAULT_PREVIEW_SIZE
    return int(getattr(args, "preview_size", DEFAULT_PREVIEW_SIZE))
