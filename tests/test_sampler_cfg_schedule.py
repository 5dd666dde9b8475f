"""MochiXDiTSampler's cfg_schedule input (optional STRING; empty = the cfg widget for every step):
checked at queue time through the one parser, refused off the on-rank path."""

import pytest

from mochi_xdit.nodes.sampler import sampler_problem

WIDGETS = dict(seed=0, steps=4, cfg=4.5, schedule="linear_quadratic", denoise=1.0, sampler_name=None, scheduler=None)


def test_empty_or_matching_schedule_passes():
    assert sampler_problem(**WIDGETS) is None
    assert sampler_problem(**WIDGETS, cfg_schedule="  ") is None  # blank = no schedule
    assert sampler_problem(**WIDGETS, cfg_schedule="4.5*2,1*2") is None
    assert sampler_problem(**{**WIDGETS, "steps": None}, cfg_schedule="4.5*2") is None  # steps linked: run time


@pytest.mark.parametrize("text,fragment", [
    ("4.5*3", "cfg_schedule: the cfg schedule '4.5*3' covers 3 steps but steps=4"),
    ("4.5*x,1", "cfg_schedule: cfg schedule entry '4.5*x' is not"),
])
def test_bad_schedule_is_refused_with_the_fix(text, fragment):
    assert fragment in sampler_problem(**WIDGETS, cfg_schedule=text)


def test_schedule_off_the_on_rank_path_is_refused(monkeypatch):
    from mochi_xdit.nodes import sampler

    monkeypatch.setattr(sampler, "comfy_choices", lambda: (["euler", "dpmpp_2m"], ["simple", "karras"]))
    widgets = {**WIDGETS, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
    assert "cfg_schedule runs on the on-rank path only" in sampler_problem(**widgets, cfg_schedule="4.5*4")
    assert sampler_problem(**widgets) is None
