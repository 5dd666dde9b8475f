"""The Ray rank pool: one actor per parallel rank, the step protocol, failure handling.
Never imports ComfyUI."""
