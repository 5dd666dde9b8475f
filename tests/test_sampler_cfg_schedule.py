"""MochiXDiTSampler's cfg_schedule input (optional STRING; empty = the cfg widget for every step):
checked at queue time through the run resolver's one parser, refused off the on-rank path."""

import pytest

from mochi_xdit.nodes import sampler
from mochi_xdit.nodes.sampler import sampler_problem

WIDGETS = dict(seed=0, steps=4, cfg=4.5, sampler_name="euler", scheduler="linear_quadratic", denoise=1.0,
               cache="off", cache_threshold=0.06, schedule=None)


@pytest.fixture(autouse=True)
def comfy_lists(monkeypatch):
    monkeypatch.setattr(sampler, "comfy_choices", lambda: {"sampler_name": ["euler", "dpmpp_2m"],
                                                           "scheduler": ["simple", "karras", "linear_quadratic"]})


def test_empty_or_matching_schedule_passes():
    assert sampler_problem(dict(WIDGETS, cfg_schedule=None)) is None  # an old prompt without the input
    assert sampler_problem(dict(WIDGETS, cfg_schedule="  ")) is None  # blank = no schedule
    assert sampler_problem(dict(WIDGETS, cfg_schedule="4.5*2,1*2")) is None
    assert sampler_problem(dict(WIDGETS, steps=None, cfg_schedule="4.5*2")) is None  # steps linked: run time


@pytest.mark.parametrize("text,fragment", [
    ("4.5*3", "cfg_schedule: the cfg schedule '4.5*3' covers 3 steps but steps=4"),
    ("4.5*x,1", "cfg_schedule: cfg schedule entry '4.5*x' is not"),
    ("4.5*2,-1*2", "cfg_schedule: cfg=-1.0 must be >= 0"),
])
def test_bad_schedule_is_refused_with_the_fix(text, fragment):
    assert fragment in sampler_problem(dict(WIDGETS, cfg_schedule=text))


def test_schedule_off_the_on_rank_path_is_refused():
    widgets = dict(WIDGETS, sampler_name="dpmpp_2m", scheduler="karras")
    assert "cfg_schedule runs on the on-rank path only" in sampler_problem(dict(widgets, cfg_schedule="4.5*4"))
    assert sampler_problem(dict(widgets, cfg_schedule="")) is None


def test_the_plan_carries_one_scale_per_step_and_uses_cfg_sees_every_scale():
    from mochi_xdit.workers.run_plan import RunChoices, resolve_run

    plan = resolve_run(RunChoices(steps=4, cfg=4.5, cfg_schedule="1*3,2"))
    assert plan.cfg == (1.0, 1.0, 1.0, 2.0) and plan.uses_cfg
    assert not resolve_run(RunChoices(steps=2, cfg=4.5, cfg_schedule="1*2")).uses_cfg
