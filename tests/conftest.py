"""Shared fixtures. Tests are not a package (xfuser installs a top-level `tests` package), so
shared helpers live in the project (`mochi_xdit.mochi.demo`) or here as fixtures."""

import torch

torch.set_num_threads(1)
