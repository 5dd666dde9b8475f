"""The option table: every node widget, queue-time check and CLI flag comes from one declaration, and
the run resolver decides what runs where for both front doors."""

import argparse

import pytest

from mochi_xdit.mochi.step_cache import StepCacheKind
from mochi_xdit.workers.choices import CACHE_CHOICES
from mochi_xdit.workers.option_table import Door, OPTIONS, add_cli_flags, node_inputs, option, widget_problem
from mochi_xdit.workers.options import OptionsError
from mochi_xdit.workers.run_plan import RunChoices, SamplerPath, resolve_run


def test_cache_choices_are_off_and_the_step_cache_kinds():
    assert CACHE_CHOICES == ("off", *(kind.value for kind in StepCacheKind))


def test_a_node_widget_and_a_cli_flag_share_default_limits_and_help():
    steps = node_inputs(Door.SAMPLER)["required"]["steps"]
    assert steps == ("INT", {"tooltip": option("steps").help, "default": 64, "min": 1, "max": 1000, "step": 1})
    parser = argparse.ArgumentParser()
    add_cli_flags(parser, Door.GENERATE)
    flags = {action.dest: action for action in parser._actions}
    assert flags["cfg"].default == node_inputs(Door.SAMPLER)["required"]["cfg"][1]["default"] == 4.5
    assert flags["steps"].default is None  # the resolver picks 64 (8 for the demo model)
    assert parser.parse_args(["--prompt", "x", "--schedule", "simple"]).scheduler == "simple"  # the old flag name
    assert parser.parse_args(["--prompt", "x", "--ulysses", "auto"]).ulysses_degree == 0


def test_lora_strength_has_one_rule_at_both_doors():
    assert "strength=100.0 is outside [-10.0, 10.0]" in widget_problem(Door.LORA, {"strength": 100.0})
    assert node_inputs(Door.LORA)["required"]["strength"][1]["max"] == option("strength").high == 10.0


def test_every_option_is_shown_somewhere_and_has_help():
    for entry in OPTIONS.values():
        assert entry.doors and entry.help, entry.name


def test_run_resolver_chooses_the_path_and_the_cache():
    plan = resolve_run(RunChoices(steps=4, scheduler="simple", cache="teacache"))
    assert plan.path is SamplerPath.ON_RANKS and plan.cache.kind is StepCacheKind.TEACACHE
    assert plan.cache.threshold == option("cache_threshold").default
    assert resolve_run(RunChoices(sampler_name="dpmpp_2m", scheduler="karras")).path is SamplerPath.COMFY
    assert resolve_run(RunChoices(masked_latent=True)).path is SamplerPath.COMFY
    assert resolve_run(RunChoices()).steps == 64 and resolve_run(RunChoices(demo=True)).steps == 8
    with pytest.raises(OptionsError, match="runs on the on-rank path only"):
        resolve_run(RunChoices(sampler_name="dpmpp_2m", cache="first_block"))
    with pytest.raises(OptionsError, match=r"steps=0 is outside \[1, 1000\]"):
        resolve_run(RunChoices(steps=0))
    noted = resolve_run(RunChoices(cache="off", cache_threshold=0.5))
    assert noted.cache is None and "has no effect while cache is off" in noted.notes[0]


def test_a_toggle_is_a_boolean_widget_and_a_pair_of_flags():
    from mochi_xdit.workers.option_table import Kind, Option, _widget, value_problem

    toggle = Option("compile", Kind.BOOL, "compile the DiT", Door.LOADER | Door.GENERATE, default=False)
    assert _widget(toggle, None) == ("BOOLEAN", {"tooltip": "compile the DiT", "default": False})
    assert value_problem(toggle, "on") == "compile must be true or false, got 'on'"


def test_the_readme_tables_are_the_declarations():
    """README.md's option tables are exactly what tools/make_readme_options.py writes from the table."""
    import os

    from mochi_xdit.workers.option_table import reference_markdown

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        text = f.read()
    begin = text.index("<!-- options:begin")
    block = text[text.index("\n", begin) + 1: text.index("<!-- options:end -->")]
    assert block == reference_markdown(), "run tools/make_readme_options.py"
