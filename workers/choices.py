"""The choices both front doors offer, importable without torch or Ray (the CLI builds its
`--help` from these in well under a second)."""

from ..mochi.constants import SCHEDULE_NAMES, WEIGHT_DTYPE_NAMES

AUTO = "auto"
WEIGHT_DTYPE_CHOICES = (AUTO, *WEIGHT_DTYPE_NAMES)
DEVICE_CHOICES = (AUTO, "cpu", "cuda")
SCHEDULE_CHOICES = SCHEDULE_NAMES
# mochi.parallel.kernel.AttentionBackend's values (kept here so --help needs no torch; a test pins them)
ATTENTION_CHOICES = ("auto", "torch", "flash_attn", "flash_attn_3", "xfuser")
CACHE_CHOICES = ("off", "teacache", "first_block")  # "off" + mochi.step_cache.StepCacheKind's values (a test pins them)
