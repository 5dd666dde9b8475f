"""What the CLI says while it works: one phase line before each slow step, and no third-party
progress bars in between (transformers' "Writing model shards" / "Loading weights" bars used to
appear between the pack's own lines, and the first run was silent while the demo was written)."""

import os
from collections.abc import Callable


def quiet_third_party_progress() -> None:
    """Switch off the progress bars of transformers and huggingface_hub for this process (the CLI's
    own phase lines and sampling bar say what happens)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the demo and T5 need transformers; without it there are no bars to hide
        return
    transformers_logging.disable_progress_bar()


def prepare_demo(say: Callable[[str], None]) -> tuple[str, str]:
    """The demo DiT and VAE paths, with the demo T5 written too; says so first when anything must be
    written (the first run), so no slow step is silent."""
    from .mochi.demo import demo_checkpoints, demo_dir, demo_paths
    from .mochi.text_encoder import write_demo_text_encoder

    t5_folder = os.path.join(str(demo_dir()), "demo_t5")
    t5_written = os.path.isfile(os.path.join(t5_folder, "DEMO_README.json"))
    if not (t5_written and all(path.is_file() for path in demo_paths())):
        say(f"writing the built-in demo model (tiny random weights) to {demo_dir()}: first run only, a few seconds")
    dit_path, vae_path = demo_checkpoints()
    if not t5_written:
        write_demo_text_encoder(t5_folder)
    return str(dit_path), str(vae_path)
