"""MochiXDiTGuider and MochiXDiTModelSampling against ComfyUI's V1 node rules, without ComfyUI.

Their work happens in `nodes/comfy_sampling.py`, which imports ComfyUI and is imported only when a
node runs; ComfyUI is not on PyPI, so the real runs (every sampler and scheduler against core) are
`tools/comfy_sampler_check.py`. Here: the schema, queue-time validation, and that importing the
node modules does not need ComfyUI.
"""

import subprocess
import sys

import pytest

from mochi_xdit.nodes.checks import QueueTimeError
from mochi_xdit.nodes.guider import MochiXDiTGuider
from mochi_xdit.nodes.handle import POOL_TYPE
from mochi_xdit.nodes.model_sampling import MochiXDiTModelSampling


def test_guider_schema_takes_pool_prompts_and_cfg_and_returns_a_guider():
    required = MochiXDiTGuider.INPUT_TYPES()["required"]
    assert list(required) == ["pool", "positive", "negative", "cfg"]
    assert required["pool"][0] == POOL_TYPE
    assert required["positive"][0] == required["negative"][0] == "CONDITIONING"
    assert required["cfg"][0] == "FLOAT" and required["cfg"][1]["default"] == 4.5
    assert all("tooltip" in spec[1] for spec in required.values())
    assert MochiXDiTGuider.RETURN_TYPES == ("GUIDER",) and callable(getattr(MochiXDiTGuider, MochiXDiTGuider.FUNCTION))
    assert MochiXDiTModelSampling.RETURN_TYPES == ("MODEL",)
    assert callable(getattr(MochiXDiTModelSampling, MochiXDiTModelSampling.FUNCTION))


def test_guider_cfg_is_checked_at_queue_time():
    assert MochiXDiTGuider.VALIDATE_INPUTS(cfg=4.5) is True
    assert MochiXDiTGuider.VALIDATE_INPUTS(cfg=None) is True  # linked input: checked when it runs
    with pytest.raises(QueueTimeError, match=r"outside \[0.0, 100.0\]"):  # raised: ComfyUI shows it once
        MochiXDiTGuider.VALIDATE_INPUTS(cfg=-1.0)
    with pytest.raises(QueueTimeError, match="must be a number"):
        MochiXDiTGuider.VALIDATE_INPUTS(cfg="high")


def test_node_modules_import_without_comfyui():
    code = ("import sys; import mochi_xdit.nodes.guider, mochi_xdit.nodes.model_sampling; "
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules), 'imported comfy'")
    subprocess.run([sys.executable, "-c", code], check=True)
