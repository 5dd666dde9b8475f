"""The pool's fp8 accumulation (`mochi.fp8_accumulation`): `_scaled_mm`'s fast accumulation is kept
only where its product stays within fp8's input rounding of the exact product of the same fp8
operands (`layers.within_fp8_rounding`, the bench's bound) on every rank; the choice reaches every
fp8 Linear's `_scaled_mm` call; nothing is measured where fp8 weights do not run `_scaled_mm`.

The GPU's fp8 path is forced on the CPU (this torch runs `torch._scaled_mm` there too, where fast
accumulation changes nothing, so the real one is kept); fakes of `_scaled_mm` play GPUs whose fast
accumulation is off by more than the bound, or by less.
"""

import pytest
import torch

from mochi_xdit.mochi import fp8_accumulation, layers
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit
from mochi_xdit.mochi.fp8_accumulation import choose_fp8_accumulation, fp8_linears
from mochi_xdit.mochi.layers import Fp8Compute

BF16 = torch.bfloat16
ROWS = 64  # activation rows per measured product (the pool uses MEASURE_ROWS)
FAR_OUTSIDE = 4.0  # relative error of a bad fast accumulation: 4 |y|, beyond 2^-4 (|x| @ |W|^T)
WELL_WITHIN = 2.0**-6  # 2^-6 |y| <= 2^-6 (|x| @ |W|^T): within the bound


class ScaledMMOffBy:
    """A `torch._scaled_mm` whose fast accumulation is off by `relative` x the product (the exact
    one is torch's own); records every call's use_fast_accum."""

    def __init__(self, relative: float):
        self.relative = relative
        self.fast_flags = []

    def __call__(self, a, b, *, use_fast_accum=False, **kwargs):
        self.fast_flags.append(use_fast_accum)
        out = torch._scaled_mm(a, b, use_fast_accum=False, **kwargs)
        return (out.float() * (1 + self.relative)).to(out.dtype) if use_fast_accum else out


def force_scaled_mm_path(module) -> None:
    """Make `module.fp8_compute` answer SCALED_MM (the fp8 GPU path) for every Linear."""
    module.fp8_compute = lambda *args: Fp8Compute.SCALED_MM


@pytest.fixture
def fp8_dit():
    return random_dit(DEMO_DIT_CONFIG, "fp8", "cpu", seed=0)


@pytest.fixture
def scaled_mm_path(monkeypatch):
    monkeypatch.setattr(fp8_accumulation, "fp8_compute", lambda *args: Fp8Compute.SCALED_MM)


def flags(model) -> set:
    return {linear.fast_accumulation for _, linear in fp8_linears(model)}


def test_fast_accumulation_outside_fp8_rounding_is_refused(fp8_dit, scaled_mm_path):
    fake = ScaledMMOffBy(FAR_OUTSIDE)
    choice = choose_fp8_accumulation(fp8_dit, "cpu", BF16, scaled_mm=fake, rows=ROWS)
    assert choice.fast is False and flags(fp8_dit) == {False}
    assert set(fake.fast_flags) == {False, True}  # both products were measured
    exact_error, fast_error = choice.relative_errors
    assert exact_error < 2.0**-7 and fast_error > 1  # the exact product is bf16-rounded, the fast one is off
    assert "outside fp8's input rounding here" in choice.note and "blocks.0.mlp_x.w2" in choice.note


def test_fast_accumulation_within_fp8_rounding_is_kept(fp8_dit, scaled_mm_path):
    choice = choose_fp8_accumulation(fp8_dit, "cpu", BF16, scaled_mm=ScaledMMOffBy(WELL_WITHIN), rows=ROWS)
    assert choice.fast is True and flags(fp8_dit) == {True}
    exact_error, fast_error = choice.relative_errors
    assert exact_error < fast_error < 2 * WELL_WITHIN
    assert choice.note.startswith("fp8 accumulation fast")


def test_the_real_scaled_mm_is_measured_and_kept_on_the_cpu(fp8_dit, scaled_mm_path):
    """CPU torch's own `_scaled_mm` (fast accumulation changes nothing there): within the bound."""
    choice = choose_fp8_accumulation(fp8_dit, "cpu", BF16, rows=ROWS)
    assert choice.fast is True
    exact_error, fast_error = choice.relative_errors
    assert 0 < exact_error == fast_error < 2.0**-7


@pytest.mark.parametrize("relative, expected", [(WELL_WITHIN, True), (FAR_OUTSIDE, False)])
def test_the_choice_reaches_every_fp8_linear_forward(fp8_dit, scaled_mm_path, monkeypatch, relative, expected):
    choose_fp8_accumulation(fp8_dit, "cpu", BF16, scaled_mm=ScaledMMOffBy(relative), rows=ROWS)
    recorded, real = [], torch._scaled_mm

    def recording(a, b, *, use_fast_accum=False, **kwargs):  # what Linear.forward calls, through scaled_mm_linear
        recorded.append(use_fast_accum)
        return real(a, b, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(layers, "fp8_compute", lambda *args: Fp8Compute.SCALED_MM)
    monkeypatch.setattr(torch, "_scaled_mm", recording)
    linears = fp8_linears(fp8_dit)
    with torch.no_grad():
        for _, linear in linears:
            linear(torch.randn(3, linear.in_features).to(BF16))
    assert recorded == [expected] * len(linears)  # every fp8 Linear, block 0's and the others


def without_data(model, kind: str):
    """The model with every weight a meta tensor, or a fake one (as the planner builds it)."""
    if kind == "meta":
        return model.to("meta")
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in list(tensors.items()):
                if tensor is not None:
                    tensors[name] = mode.from_tensor(tensor)
    return model


@pytest.mark.parametrize("weight_dtype, kind, forced", [
    ("bf16", "cpu", True),  # no fp8-stored weights
    ("fp8", "cpu", False),  # fp8 weights on the cast path (the CPU)
    ("fp8", "meta", True),  # weights without data
    ("fp8", "fake", True),  # the planner's fake tensors
])
def test_nothing_is_measured_off_the_scaled_mm_path(monkeypatch, weight_dtype, kind, forced):
    if forced:
        monkeypatch.setattr(fp8_accumulation, "fp8_compute", lambda *args: Fp8Compute.SCALED_MM)
    model = random_dit(DEMO_DIT_CONFIG, weight_dtype, "cpu", seed=0)
    model = model if kind == "cpu" else without_data(model, kind)
    fake = ScaledMMOffBy(WELL_WITHIN)
    choice = choose_fp8_accumulation(model, "meta" if kind == "meta" else "cpu", BF16, scaled_mm=fake, rows=ROWS)
    assert fake.fast_flags == [] and choice.fast is False and choice.relative_errors is None
    assert "not measured" in choice.note
    assert flags(model) <= {False}


def _rank_choices():
    """A rank of a 2-rank gloo group: (fast when rank 1's fast accumulation is off, its note; fast
    when both are within; fast with the blocks sharded over the two ranks, its note)."""
    import torch.distributed as dist

    from mochi_xdit.mochi.weight_placement import shard_blocks

    rank = dist.get_rank()
    force_scaled_mm_path(fp8_accumulation)
    model = random_dit(DEMO_DIT_CONFIG, "fp8", "cpu", seed=0)
    disagreeing = choose_fp8_accumulation(model, "cpu", BF16, group=dist.group.WORLD, rows=ROWS,
                                          scaled_mm=ScaledMMOffBy(FAR_OUTSIDE if rank == 1 else WELL_WITHIN))
    disagreeing_flags = flags(model)
    agreeing = choose_fp8_accumulation(model, "cpu", BF16, group=dist.group.WORLD, rows=ROWS,
                                       scaled_mm=ScaledMMOffBy(WELL_WITHIN))
    shard_blocks(model, torch.device("cpu"))
    sharded = choose_fp8_accumulation(model, "cpu", BF16, group=dist.group.WORLD, rows=ROWS)
    return (disagreeing.fast, disagreeing_flags, disagreeing.note, agreeing.fast, flags(model), sharded.fast,
            sharded.note)


def test_ranks_that_disagree_keep_fast_accumulation_off_on_every_rank():
    from mochi_xdit.mochi.parallel.testing import run_ranks

    ranks = run_ranks(_rank_choices, 2, timeout_s=240)
    for disagreeing, disagreeing_flags, _, agreeing, agreeing_flags, sharded, sharded_note in ranks:
        assert disagreeing is False and disagreeing_flags == {False}
        assert agreeing is True and agreeing_flags == {True}
        assert sharded is True and "[64x512 @ 512x96]" in sharded_note  # each rank's half of mlp_x.w2's rows
    assert "on another rank" in ranks[0][2] and "outside fp8's input rounding here" in ranks[1][2]


def test_a_rank_loading_fp8_weights_reports_the_choice(tmp_path, monkeypatch):
    """The actor measures at load (forced to the fp8 GPU path: CPU torch's `_scaled_mm`) and rank 0
    prints the note; without the force the CPU casts and the note says nothing was measured."""
    from safetensors.torch import save_file

    from mochi_xdit.mochi.demo import random_dit_state_dict
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.workers.actor import RankWorker
    from mochi_xdit.workers.protocol import PoolSpec

    dit_path = str(tmp_path / "dit.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), dit_path)
    spec = PoolSpec(dit_path, None, "fp8", ParallelConfig(1, num_heads=DEMO_DIT_CONFIG.num_heads))
    cast = RankWorker(0, spec)
    notes = cast.load()  # the driver logs rank 0's notes
    assert cast.fp8_accumulation.fast is False and flags(cast.dit) == {False}
    assert notes == (cast.fp8_accumulation.note,)
    assert notes[0].startswith("fp8 accumulation exact (not measured: fp8 weights multiply by casting")
    monkeypatch.setattr(fp8_accumulation, "MEASURE_ROWS", ROWS)
    monkeypatch.setattr(fp8_accumulation, "fp8_compute", lambda *args: Fp8Compute.SCALED_MM)
    measured = RankWorker(0, spec)
    notes = measured.load()
    assert measured.fp8_accumulation.fast is True and flags(measured.dit) == {True}
    assert len(notes) == 1 and notes[0].startswith("fp8 accumulation fast")
