"""Sequence (Ulysses, Ring) and CFG parallelism for the Mochi DiT over torch.distributed."""
