"""The attention kernel chosen by measurement (`kernel_choice.KernelChoice`) on CPU: the fastest
correct candidate wins, a wrong or raising kernel never does, the choice is made once and reused,
and the ranks of a pool (gloo) agree, also when one CFG rank runs no forward at the first step.

Speed differences are injected (a runner that sleeps), so no test depends on this machine's speed.
"""

import time

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.mochi.dit import MochiDiT
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import AttentionBackend, AttentionConfig, AttentionKernel, InstalledKernels
from mochi_xdit.mochi.parallel.kernel_choice import KernelChoice, candidate_kernels, run_kernel
from mochi_xdit.mochi.parallel.testing import run_ranks

K = AttentionKernel
SLOW_S = 0.02  # what an injected slow kernel adds per call: far above a tiny CPU attention call


class Runner:
    """The model's kernel calls with injected faults, counting every call."""

    def __init__(self, slow=(), wrong=(), raises=()):
        self.slow, self.wrong, self.raises = set(slow), set(wrong), set(raises)
        self.calls = 0

    def __call__(self, q, k, v, kernel, need_lse):
        self.calls += 1
        if kernel in self.raises:
            raise TypeError(f"{kernel.value}() got an unexpected keyword argument 'return_attn_probs'")
        if kernel in self.slow:
            time.sleep(SLOW_S)
        out, lse = run_kernel(q, k, v, kernel, need_lse)
        return (out + 1.0, lse) if kernel in self.wrong else (out, lse)


def qkv(Sq=40, Sk=56, H=2, Dh=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, Dh, generator=generator) for S in (Sq, Sk, Sk)]


@pytest.mark.parametrize("slow, expected", [((K.CPU_FLASH,), K.MATH), ((K.MATH,), K.CPU_FLASH)])
def test_the_faster_correct_candidate_is_chosen(slow, expected):
    choice = KernelChoice(measure=True, run=Runner(slow=slow))
    assert choice.kernel(*qkv(), need_lse=True) is expected
    (measurement,) = choice.measurements.values()
    assert set(measurement.seconds) == {K.CPU_FLASH, K.MATH} and measurement.chosen is expected
    assert measurement.tflops(expected) > 0 and expected.value in measurement.summary()


def test_a_wrong_kernel_is_never_chosen_even_when_fastest():
    choice = KernelChoice(measure=True, run=Runner(slow=(K.MATH,), wrong=(K.CPU_FLASH,)))
    assert choice.kernel(*qkv(), need_lse=False) is K.MATH
    (measurement,) = choice.measurements.values()
    assert K.CPU_FLASH not in measurement.seconds and "wrong" in measurement.rejected[K.CPU_FLASH]


def test_a_kernel_that_raises_is_skipped():
    choice = KernelChoice(measure=True, run=Runner(slow=(K.MATH,), raises=(K.CPU_FLASH,)))
    assert choice.kernel(*qkv(), need_lse=True) is K.MATH
    assert "raised TypeError" in choice.measurements[next(iter(choice.measurements))].rejected[K.CPU_FLASH]


def test_no_working_kernel_is_an_error_naming_each_reason():
    choice = KernelChoice(measure=True, run=Runner(wrong=(K.MATH,), raises=(K.CPU_FLASH,)))
    message = r"no attention kernel ran correctly.*cpu_flash: raised TypeError.*math: wrong"
    with pytest.raises(RuntimeError, match=message):
        choice.kernel(*qkv(), need_lse=False)


def test_the_choice_is_measured_once_per_shape_class_and_reused():
    runner = Runner()
    choice = KernelChoice(measure=True, run=runner)
    first = choice.kernel(*qkv(), need_lse=False)
    calls = runner.calls
    assert calls > 0
    for S in (40, 71, 9):  # other token counts: the same class
        assert choice.kernel(*qkv(Sq=S, Sk=S + 5), need_lse=False) is first
    assert runner.calls == calls
    choice.kernel(*qkv(), need_lse=True)  # another class (the log-sum-exp): measured once more
    assert runner.calls > calls and len(choice.measurements) == 2


def build_model() -> MochiDiT:
    with torch.device("meta"):
        model = MochiDiT(DEMO_DIT_CONFIG)
    model.load_state_dict(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), assign=True)
    return model.eval()


def forward_inputs(L: int = 5):
    generator = torch.Generator().manual_seed(L)
    mask = torch.zeros(1, 8, dtype=torch.int64)
    mask[:, :L] = 1
    return (torch.randn(1, 12, 1, 6, 8, generator=generator), torch.tensor([0.6]),
            torch.randn(1, 8, 4096, generator=generator), mask)


@torch.no_grad()
def test_a_dit_measures_at_its_first_forward_only_and_matches_the_guess():
    model = build_model()
    runner = Runner()
    choice = KernelChoice(measure=True, run=runner)
    expected = model(*forward_inputs())  # the guess (cpu_flash)
    out = model(*forward_inputs(), attention=choice)
    calls = runner.calls
    model(*forward_inputs(L=3), attention=choice)  # another prompt length, same class
    assert runner.calls == calls and len(choice.measurements) == 1
    assert (out - expected).abs().max().item() <= 1e-5


def test_the_guess_is_kept_without_measuring():
    runner = Runner()
    choice = KernelChoice(run=runner)
    assert choice.kernel(*qkv(), need_lse=True) is K.CPU_FLASH and runner.calls == 0 and not choice.measurements


HOPPER_FA = InstalledKernels(flash_attn=True, flash_attn_3=True, cuda_capability=(9, 0), cudnn_version=91600)


@pytest.mark.parametrize("requested, installed, dtype, expected", [
    ("auto", HOPPER_FA, torch.bfloat16, (K.FLASH_ATTN_3, K.FLASH_ATTN, K.TORCH_CUDNN, K.TORCH_FLASH,
                                          K.TORCH_EFFICIENT, K.MATH)),
    ("torch", HOPPER_FA, torch.bfloat16, (K.TORCH_CUDNN, K.TORCH_FLASH, K.TORCH_EFFICIENT, K.MATH)),
    ("auto", InstalledKernels(cuda_capability=(9, 0), cudnn_version=91500), torch.bfloat16,
     (K.TORCH_FLASH, K.TORCH_CUDNN, K.TORCH_EFFICIENT, K.MATH)),  # the guess first, cuDNN still tried
    ("flash_attn", HOPPER_FA, torch.bfloat16, (K.FLASH_ATTN,)),  # an explicit request is honoured
    ("auto", HOPPER_FA, torch.float32, (K.TORCH_EFFICIENT, K.MATH)),
])
def test_candidates_start_with_the_version_guess(requested, installed, dtype, expected):
    assert candidate_kernels("cuda", dtype, True, requested, installed) == expected


def test_cpu_candidates_are_the_cpu_flash_kernel_and_math():
    assert candidate_kernels("cpu", torch.float32, False) == (K.CPU_FLASH, K.MATH)


# -- the ranks of a pool agree --------------------------------------------------------------------


def rank_main() -> dict:
    """Each rank slows a different kernel (alone they would choose differently), and rank 1's
    flash kernel raises; then a CFG-split sampling run at cfg 1, where rank 1 runs no forward."""
    import torch.distributed as dist

    from mochi_xdit.mochi.parallel.layout import ParallelContext
    from mochi_xdit.mochi.sampler import DenoiseLoop, SampleRequest
    from mochi_xdit.mochi.text import TextCondition

    rank = dist.get_rank()
    results = {}
    slow = (K.CPU_FLASH,) if rank == 0 else (K.MATH,)
    choice = KernelChoice(measure=True, group=dist.group.WORLD, run=Runner(slow=slow))
    results["disagreeing_speeds"] = choice.kernel(*qkv(seed=rank), need_lse=True)
    raises = (K.CPU_FLASH,) if rank == 1 else ()
    choice = KernelChoice(measure=True, group=dist.group.WORLD, run=Runner(slow=(K.MATH,), raises=raises))
    results["fails_on_rank_1"] = choice.kernel(*qkv(seed=rank), need_lse=False)
    # no queries on rank 1 (a shard of padding): it takes part without timing
    results["no_queries_on_rank_1"] = choice_kernel_without_queries(rank)

    model = build_model()
    for name, (ulysses, ring) in {"ulysses2": (2, 1), "ring2": (1, 2)}.items():  # measured inside USP / the ring
        ctx = ParallelContext(ParallelConfig(2, 1, ulysses, ring, num_heads=DEMO_DIT_CONFIG.num_heads))
        choice = KernelChoice(measure=True, group=dist.group.WORLD)
        with torch.no_grad():
            measured = model(*forward_inputs(), ctx=ctx, attention=choice)
            results[name] = ((measured - model(*forward_inputs(), ctx=ctx)).abs().max().item(), dict(choice._chosen))
        ctx.close()

    ctx = ParallelContext(ParallelConfig(2, cfg_degree=2, num_heads=DEMO_DIT_CONFIG.num_heads))
    choice = KernelChoice(measure=True, group=dist.group.WORLD)
    mask = torch.zeros(1, 8, dtype=torch.int64)
    mask[:, :3] = 1
    positive = TextCondition(torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1)), mask)
    request = SampleRequest(positive, TextCondition.empty(8), latent_shape=(1, 12, 1, 6, 8), steps=2, cfg=1.0)
    with torch.no_grad():
        loop = DenoiseLoop(build_model(), request, ctx=ctx, attention=choice)
        loop.begin()
        for i in range(loop.num_steps):
            loop.step(i)
    results["cfg1_chosen"] = dict(choice._chosen)
    ctx.close()
    return results


def choice_kernel_without_queries(rank: int):
    import torch.distributed as dist

    choice = KernelChoice(measure=True, group=dist.group.WORLD, run=Runner(slow=(K.CPU_FLASH,)))
    q, k, v = qkv(Sq=40 if rank == 0 else 0)
    return choice.kernel(q, k, v, need_lse=True)


def test_ranks_of_a_pool_agree_on_one_kernel():
    first, second = run_ranks(rank_main, 2, timeout_s=240, collective_timeout_s=60)
    assert first["disagreeing_speeds"] is second["disagreeing_speeds"]  # the slowest rank's time decides
    assert first["fails_on_rank_1"] is second["fails_on_rank_1"] is K.MATH  # failing anywhere: out
    assert first["no_queries_on_rank_1"] is second["no_queries_on_rank_1"] is K.MATH  # rank 0's measurement
    assert first["cfg1_chosen"] == second["cfg1_chosen"] and len(first["cfg1_chosen"]) == 1
    for layout in ("ulysses2", "ring2"):
        assert first[layout][1] == second[layout][1] and len(first[layout][1]) == 1
        assert first[layout][0] <= 1e-5 and second[layout][0] <= 1e-5  # against the guessed kernel


def test_xfuser_and_planned_devices_never_measure():
    assert not KernelChoice(AttentionConfig(AttentionBackend.XFUSER), measure=True).measures
    assert not KernelChoice(AttentionConfig(device_type="cuda"), measure=True).measures
