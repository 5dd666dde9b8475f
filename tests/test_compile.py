"""`DiTCompile.ON` (torch.compile of each block's regions between collectives, Inductor's C++
backend on CPU) equals eager within 1e-5 fp32 on one rank and with Ulysses 2, and after
`compile_now` a new token count or prompt length does not compile again.

Compiling is the slow part (Inductor writes and builds C++), so the file is kept to one launch of
two gloo ranks that share their compiled regions: the one-rank cases run on each rank without a
context, then one parallel mix (Ulysses 2). Ring and the CFG split go through the same regions
(only attention and the collectives differ, and they stay eager); bench/compile_speedup.py and
bench/gpu_acceptance.py measure the rest.
"""

import dataclasses
import functools

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.dit import DiTCompile, MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.testing import run_ranks

pytestmark = pytest.mark.timeout(600)

TOLERANCE = 1e-5
CONFIG = dataclasses.replace(DEMO_DIT_CONFIG, t5_feat_dim=64)
LATENT = (1, 12, 1, 10, 14)  # 35 video tokens: not divisible by 2 (padding on the last rank)
OTHER_LATENT = (1, 12, 1, 6, 10)  # 15 video tokens
TEXT, OTHER_TEXT = 7, 11


def build_model(compile: DiTCompile, t5_feat_dim: int = 64) -> MochiDiT:
    config = dataclasses.replace(DEMO_DIT_CONFIG, t5_feat_dim=t5_feat_dim)
    with torch.device("meta"):
        model = MochiDiT(config, compile=compile)
    model.load_state_dict(random_dit_state_dict(config, seed=0), assign=True)
    return model.eval()


def forward_inputs(latent_shape, L: int):
    generator = torch.Generator().manual_seed(L + latent_shape[-1])
    mask = torch.zeros(1, 16, dtype=torch.int64)
    mask[:, :L] = 1
    return (torch.randn(latent_shape, generator=generator), torch.tensor([0.7]),
            torch.randn(1, 16, 64, generator=generator), mask)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@torch.no_grad()
def rank_main() -> dict:
    from mochi_xdit.mochi.parallel.layout import ParallelContext

    eager, compiled = build_model(DiTCompile.OFF), build_model(DiTCompile.ON)
    for joined in (True, False):  # what a rank does when it loads: every region built here
        compiled.compile_now(torch.device("cpu"), torch.float32, joined)
    built = graphs_compiled()
    errors = {}

    def error(ctx, latent_shape, L):
        inputs = forward_inputs(latent_shape, L)
        return (compiled(*inputs, ctx=ctx) - eager(*inputs, ctx=ctx)).abs().max().item()

    for latent_shape, L in ((LATENT, TEXT), (OTHER_LATENT, OTHER_TEXT)):  # another size and prompt length
        errors["one", latent_shape, L] = error(None, latent_shape, L)
    ctx = ParallelContext(ParallelConfig(2, 1, 2, 1, num_heads=CONFIG.num_heads))
    errors["ulysses2", LATENT, TEXT] = error(ctx, LATENT, TEXT)
    ctx.close()
    return {"errors": errors, "after_compile_now": graphs_compiled() - built}


@functools.lru_cache(maxsize=None)
def launch() -> list[dict]:
    return run_ranks(rank_main, 2, timeout_s=580, collective_timeout_s=300)


def test_compiled_regions_match_eager_on_one_rank_and_ulysses2_without_compiling_again():
    for rank, result in enumerate(launch()):
        for case, error in result["errors"].items():
            assert error <= TOLERANCE, f"rank {rank} {case}: compiled vs eager max abs error {error:.2e}"
        assert result["after_compile_now"] == 0  # compile_now built every region; a new size reuses them


def test_compile_option_parses_values_and_refuses_others():
    assert DiTCompile.parse("on") is DiTCompile.ON and DiTCompile.parse(DiTCompile.OFF) is DiTCompile.OFF
    with pytest.raises(ValueError, match="compile='yes'; use one of off, on"):
        DiTCompile.parse("yes")
