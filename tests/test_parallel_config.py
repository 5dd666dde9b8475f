"""ParallelConfig validation and the `auto` choice: every bad layout is refused with a message that
names the valid choices, before any process group exists."""

import pytest
import torch.distributed as dist

from mochi_xdit.mochi.parallel.config import ParallelConfig, auto
from mochi_xdit.mochi.parallel.kernel import AttentionBackend, AttentionConfig, InstalledKernels
from mochi_xdit.mochi.parallel.layout import ParallelContext


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=24, ulysses_degree=5, ring_degree=5), "ulysses=5 does not divide 24 heads; use 2, 3, 4, 6, 8, 12 or 24, or put the factor on ring"),
        (dict(world_size=4, ulysses_degree=3, ring_degree=1, num_heads=4), "ulysses=3 does not divide 4 heads; use 2 or 4"),
        (dict(world_size=6, cfg_degree=3, ring_degree=2), "cfg=3 is not supported; use 1"),
        (dict(world_size=4, ulysses_degree=2), "= 2, but world_size is 4"),
        (dict(world_size=8, cfg_degree=2, ulysses_degree=2, ring_degree=4), "= 16, but world_size is 8"),
        (dict(world_size=0), "world_size must be a positive integer"),
        (dict(world_size=2, ring_degree=0), "ring_degree must be a positive integer"),
        (dict(world_size=2, ring_degree=2.0), "ring_degree must be a positive integer"),
    ],
)
def test_invalid_config_rejected_before_any_process_group(kwargs, message):
    with pytest.raises(ValueError) as error:
        ParallelConfig(**kwargs)
    assert message in str(error.value)
    assert not dist.is_initialized()


def test_world_mismatch_message_suggests_a_valid_layout():
    with pytest.raises(ValueError, match=r"for example cfg=2, ulysses=4, ring=1"):
        ParallelConfig(world_size=8, ulysses_degree=2, num_heads=4)


def test_context_needs_an_initialised_default_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelContext(ParallelConfig(world_size=2, ulysses_degree=2))


@pytest.mark.parametrize(
    "world, heads, use_cfg, expected",
    [
        (1, 24, True, (1, 1, 1)),
        (2, 24, True, (2, 1, 1)),
        (2, 24, False, (1, 2, 1)),
        (6, 24, True, (2, 3, 1)),
        (8, 24, True, (2, 4, 1)),
        (16, 24, False, (1, 8, 2)),
        (5, 24, True, (1, 1, 5)),  # odd world: no CFG split, 5 does not divide 24 -> ring
        (10, 24, True, (2, 1, 5)),
        (12, 4, True, (2, 2, 3)),
        (9, 6, False, (1, 3, 3)),
    ],
)
def test_auto_prefers_cfg_then_largest_ulysses_then_ring(world, heads, use_cfg, expected):
    config = auto(world, num_heads=heads, num_tokens=14310, use_cfg=use_cfg)
    assert (config.cfg_degree, config.ulysses_degree, config.ring_degree) == expected
    assert config.world_size == world and config.num_heads == heads


def test_auto_refuses_more_sequence_ranks_than_tokens():
    with pytest.raises(ValueError, match="at most 3 sequence ranks"):
        auto(8, num_heads=24, num_tokens=3, use_cfg=False)


def test_sp_degree_is_ulysses_times_ring():
    assert ParallelConfig(world_size=12, cfg_degree=2, ulysses_degree=3, ring_degree=2).sp_degree == 6


def test_xfuser_backend_on_cpu_is_a_clear_error_before_any_group():
    xfuser = AttentionConfig(AttentionBackend.XFUSER, installed=InstalledKernels(xfuser=True))
    with pytest.raises(ValueError, match="runs on CUDA GPUs only.*use attention_backend=auto"):
        ParallelContext(ParallelConfig(world_size=2, ulysses_degree=2), device="cpu", attention=xfuser)
    assert not dist.is_initialized()


def test_xfuser_backend_without_xfuser_installed_names_the_install_line():
    nothing = AttentionConfig(AttentionBackend.XFUSER, installed=InstalledKernels(), device_type="cuda")
    with pytest.raises(ValueError, match=r"needs xfuser and yunchang on every rank: pip install xfuser"):
        ParallelContext(ParallelConfig(world_size=2, ulysses_degree=2), device="cpu", attention=nothing)
    assert not dist.is_initialized()


def test_unknown_attention_backend_lists_the_choices():
    with pytest.raises(ValueError, match="use one of auto, torch, flash_attn, flash_attn_3, xfuser"):
        AttentionConfig("flash")



def _xfuser_groups_on_rank(layouts: list[tuple[int, int, int]]) -> list[dict]:
    """Build layouts (cfg, ulysses, ring) with the xfuser backend against a stand-in xfuser /
    yunchang (the real ones need a GPU to import); report the groups handed to yunchang."""
    import sys
    import types

    handed = {}
    globals_module = types.ModuleType("yunchang.globals")
    globals_module.PROCESS_GROUP = types.SimpleNamespace(ULYSSES_PG="unset", RING_PG="unset")

    class LongContextAttention:
        def __init__(self, ring_impl_type):
            pg = globals_module.PROCESS_GROUP
            handed.update(ulysses=pg.ULYSSES_PG, ring=pg.RING_PG)

    attention_module = types.ModuleType("xfuser.core.long_ctx_attention")
    attention_module.xFuserLongContextAttention = LongContextAttention
    sys.modules.update({"yunchang": types.ModuleType("yunchang"), "yunchang.globals": globals_module,
                        "xfuser": types.ModuleType("xfuser"), "xfuser.core": types.ModuleType("xfuser.core"),
                        "xfuser.core.long_ctx_attention": attention_module})
    config = AttentionConfig(AttentionBackend.XFUSER, installed=InstalledKernels(xfuser=True, cuda_capability=(9, 0)),
                             device_type="cuda")
    reports = []
    for cfg, ulysses, ring in layouts:
        ctx = ParallelContext(ParallelConfig(world_size=cfg * ulysses * ring, cfg_degree=cfg, ulysses_degree=ulysses,
                                             ring_degree=ring), device="cpu", attention=config)
        reports.append({name: None if group is None else dist.get_process_group_ranks(group)
                        for name, group in handed.items()})
        ctx.close()
    return reports


def test_xfuser_gets_real_groups_never_none_the_whole_world():
    """yunchang reads a None group as the whole world: with cfg 2 its all-to-all would mix the branches."""
    from mochi_xdit.mochi.parallel.testing import run_ranks

    layouts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (cfg, ulysses, ring)
    rank0, rank1 = run_ranks(_xfuser_groups_on_rank, 2, layouts, timeout_s=120)
    assert rank0 == [{"ulysses": [0], "ring": [0]}, {"ulysses": [0, 1], "ring": [0]}, {"ulysses": [0], "ring": [0, 1]}]
    assert rank1 == [{"ulysses": [1], "ring": [1]}, {"ulysses": [0, 1], "ring": [1]}, {"ulysses": [1], "ring": [0, 1]}]
