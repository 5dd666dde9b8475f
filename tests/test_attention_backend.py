"""The attention kernel choice on a machine without a GPU: `choose_backend` and `backend_problem`
for every branch (installed packages and GPU capabilities faked with `InstalledKernels`), the
dispatch of each kernel (PyTorch's CUDA kernels on fake tensors, flash-attn 2/3 through stand-in
modules), the math path's refusal on a GPU, and the planner counting the kernel a CUDA rank runs.
"""

import math
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG
from mochi_xdit.mochi.dit import MochiDiT
from mochi_xdit.mochi.joint_attention import joint_attention
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import (
    AttentionBackend,
    AttentionConfig,
    AttentionKernel,
    InstalledKernels,
    attention,
    attention_with_lse,
    backend_problem,
    choose_backend,
    kernel_for_keys,
)
from mochi_xdit.mochi.planner.counting import Counter
from mochi_xdit.mochi.planner.simulate import count_step

K = AttentionKernel
A = AttentionBackend
NOTHING = InstalledKernels()
HOPPER = InstalledKernels(cuda_capability=(9, 0), cudnn_version=91600)
HOPPER_OLD_CUDNN = InstalledKernels(cuda_capability=(9, 0), cudnn_version=91500)
AMPERE = InstalledKernels(cuda_capability=(8, 0), cudnn_version=91600)
TURING = InstalledKernels(cuda_capability=(7, 5))
BLACKWELL = InstalledKernels(cuda_capability=(10, 0), cudnn_version=91600)
RTX_BLACKWELL = InstalledKernels(cuda_capability=(12, 0), cudnn_version=91600)
FA2_AMPERE = InstalledKernels(flash_attn=True, cuda_capability=(8, 0))
FA2_HOPPER = InstalledKernels(flash_attn=True, cuda_capability=(9, 0), cudnn_version=91600)
FA3_HOPPER = InstalledKernels(flash_attn=True, flash_attn_3=True, cuda_capability=(9, 0), cudnn_version=91600)
FA3_AMPERE_BUILD = InstalledKernels(flash_attn_3=True, cuda_capability=(8, 0))
XFUSER = InstalledKernels(xfuser=True, cuda_capability=(9, 0))
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

CHOICES = [
    # device, dtype, requested, installed, expected
    ("cpu", FP32, A.AUTO, NOTHING, K.CPU_FLASH),
    ("cpu", BF16, A.TORCH, NOTHING, K.CPU_FLASH),
    ("cpu", FP64, A.AUTO, NOTHING, K.CPU_FLASH),
    ("cpu", torch.complex64, A.AUTO, NOTHING, K.MATH),
    ("mps", FP32, A.AUTO, NOTHING, K.MATH),
    ("cuda", BF16, A.AUTO, NOTHING, K.TORCH_FLASH),  # capability unknown: planned as Ampere or newer
    ("cuda", BF16, A.AUTO, AMPERE, K.TORCH_FLASH),
    ("cuda", FP16, A.AUTO, TURING, K.TORCH_EFFICIENT),  # no flash kernel before 8.0
    ("cuda", BF16, A.AUTO, HOPPER, K.TORCH_CUDNN),  # where PyTorch prefers cuDNN
    ("cuda", BF16, A.AUTO, HOPPER_OLD_CUDNN, K.TORCH_FLASH),  # cuDNN <= 9.15: not preferred
    ("cuda", BF16, A.AUTO, BLACKWELL, K.TORCH_CUDNN),
    ("cuda", BF16, A.AUTO, RTX_BLACKWELL, K.TORCH_FLASH),
    ("cuda", BF16, A.TORCH, FA3_HOPPER, K.TORCH_CUDNN),  # torch: never the optional packages
    ("cuda", BF16, A.TORCH, FA2_AMPERE, K.TORCH_FLASH),
    ("cuda", BF16, A.AUTO, FA2_AMPERE, K.FLASH_ATTN),
    ("cuda", BF16, A.AUTO, FA2_HOPPER, K.TORCH_CUDNN),  # cuDNN beats flash-attn 2 on Hopper
    ("cuda", BF16, A.FLASH_ATTN, FA2_HOPPER, K.FLASH_ATTN),  # an explicit request is honoured
    ("cuda", FP16, A.AUTO, FA3_HOPPER, K.FLASH_ATTN_3),
    ("cuda", BF16, A.FLASH_ATTN_3, FA3_HOPPER, K.FLASH_ATTN_3),
    ("cuda", BF16, A.FLASH_ATTN, FA3_HOPPER, K.FLASH_ATTN),
    ("cuda", BF16, A.AUTO, FA3_AMPERE_BUILD, K.TORCH_FLASH),  # FA3 needs Hopper
    ("cuda", FP32, A.FLASH_ATTN_3, FA3_HOPPER, K.TORCH_EFFICIENT),  # fp32: PyTorch's kernel
    ("cuda", FP32, A.FLASH_ATTN, FA2_AMPERE, K.TORCH_EFFICIENT),
    ("cuda", FP32, A.AUTO, HOPPER, K.TORCH_EFFICIENT),
    ("cuda", FP64, A.AUTO, HOPPER, K.MATH),
    ("cuda", BF16, A.XFUSER, XFUSER, K.XFUSER),
]


@pytest.mark.parametrize("need_lse", [True, False])
@pytest.mark.parametrize("device, dtype, requested, installed, expected", CHOICES)
def test_choose_backend_picks_the_kernel_for_device_dtype_and_installed(device, dtype, requested, installed, expected,
                                                                          need_lse):
    assert choose_backend(device, dtype, need_lse, requested, installed) is expected
    assert choose_backend(device, dtype, need_lse, requested.value, installed) is expected  # strings parse


def test_kernel_names_compare_as_strings():
    kernel = choose_backend("cuda", BF16, True, "auto", AMPERE)
    assert isinstance(kernel, str) and kernel == "torch_flash"
    assert AttentionBackend("flash_attn_3") is A.FLASH_ATTN_3


PROBLEMS = [
    # requested, device, installed, world_size, expected fragment (None: no problem)
    (A.AUTO, "cpu", NOTHING, None, None),
    (A.TORCH, "cuda", NOTHING, None, None),
    (A.FLASH_ATTN, "cpu", FA2_AMPERE, None, "runs on CUDA GPUs only, but the ranks run on cpu; use attention_backend=auto"),
    (A.FLASH_ATTN, "cuda", NOTHING, None, "needs the flash-attn package on every rank: pip install flash-attn --no-build-isolation"),
    (A.FLASH_ATTN, "cuda", InstalledKernels(flash_attn=True, cuda_capability=(7, 5)), None, "needs compute capability 8.0 or newer, this GPU has 7.5"),
    (A.FLASH_ATTN, "cuda", FA2_AMPERE, None, None),
    (A.FLASH_ATTN, "cuda", InstalledKernels(flash_attn=True), None, None),  # capability unknown: allowed
    (A.FLASH_ATTN_3, "cpu", FA3_HOPPER, None, "runs on CUDA GPUs only"),
    (A.FLASH_ATTN_3, "cuda", FA2_HOPPER, None, "flash-attention.git#subdirectory=hopper"),
    (A.FLASH_ATTN_3, "cuda", FA3_AMPERE_BUILD, None, "runs on Hopper GPUs (compute capability 9.x), this GPU has 8.0"),
    (A.FLASH_ATTN_3, "cuda", FA3_HOPPER, None, None),
    (A.XFUSER, "cpu", XFUSER, 2, "runs on CUDA GPUs only"),
    (A.XFUSER, "cuda", HOPPER, 2, "needs xfuser and yunchang on every rank: pip install xfuser yunchang triton"),
    (A.XFUSER, "cuda", XFUSER, 1, "needs two or more ranks (this pool has 1); use attention_backend=auto"),
    (A.XFUSER, "cuda", XFUSER, 2, None),
    (A.XFUSER, "cuda", XFUSER, None, None),
]


@pytest.mark.parametrize("requested, device, installed, world_size, fragment", PROBLEMS)
def test_backend_problem_names_what_to_install_or_choose(requested, device, installed, world_size, fragment):
    problem = backend_problem(requested, device, installed, world_size)
    if fragment is None:
        assert problem is None
    else:
        assert fragment in problem


def test_choose_backend_refuses_what_backend_problem_refuses():
    with pytest.raises(ValueError, match="pip install flash-attn"):
        choose_backend("cuda", BF16, True, "flash_attn", NOTHING)
    with pytest.raises(ValueError, match="use one of auto, torch, flash_attn, flash_attn_3, xfuser"):
        choose_backend("cuda", BF16, True, "flash", NOTHING)


def test_detect_reads_the_installed_packages(monkeypatch):
    found = InstalledKernels.detect()
    assert (found.cuda_capability is None) == (not torch.cuda.is_available())
    stand_in = types.ModuleType("flash_attn")
    stand_in.flash_attn_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.ModuleType("flash_attn_interface"))  # no function
    detected = InstalledKernels.detect()
    assert detected.flash_attn and not detected.flash_attn_3


# -- dispatch ----------------------------------------------------------------------------------


def qkv(B=1, H=3, Sq=37, Sk=45, Dh=16, dtype=torch.float32, seed=0):
    """q [B, H, Sq, Dh] and k, v [B, H, Sk, Dh], stored [B, S, H, Dh] like the model's."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, Dh, generator=generator, dtype=dtype).transpose(1, 2) for S in (Sq, Sk, Sk)]


def reference(q, k, v):
    """Softmax attention and log-sum-exp in fp64 (the textbook formula)."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Sq, Sk]
    return torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1)


def test_cpu_flash_kernel_is_the_one_cpu_always_ran():
    q, k, v = qkv()
    expected_out, expected_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
    out, lse = attention_with_lse(q, k, v)  # default: cpu_flash
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert torch.equal(attention(q, k, v, kernel=K.CPU_FLASH), expected_out)


@pytest.mark.parametrize("kernel", [K.CPU_FLASH, K.MATH])
def test_cpu_kernels_match_the_formula(kernel):
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v, kernel=kernel)
    expected_out, expected_lse = reference(q, k, v)
    assert (out.double() - expected_out).abs().max() < 1e-5
    assert (lse.double() - expected_lse).abs().max() < 1e-5


def test_no_keys_give_zero_output_and_minus_infinity_lse():
    q, k, v = qkv(Sk=0)
    out, lse = attention_with_lse(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()
    assert torch.equal(attention(q, k, v), torch.zeros_like(out))


TORCH_CUDA_OPS = {
    K.TORCH_FLASH: "aten._scaled_dot_product_flash_attention",
    K.TORCH_EFFICIENT: "aten._scaled_dot_product_efficient_attention",
    K.TORCH_CUDNN: "aten._scaled_dot_product_cudnn_attention",
}


@pytest.mark.parametrize("kernel", list(TORCH_CUDA_OPS))
def test_torch_cuda_kernels_dispatch_their_op_and_return_lse_per_query(kernel):
    # Fake tensors run the CUDA kernels' shape functions on a CPU-only torch.
    B, H, Sq, Sk, Dh = 1, 3, 37, 45, 64  # Sq not a multiple of 32: the efficient kernel pads its LSE
    fake_mode = FakeTensorMode()
    counter = Counter(fake_mode)
    with fake_mode, counter:
        q = torch.empty(B, Sq, H, Dh, dtype=BF16).transpose(1, 2)
        k = v = torch.empty(B, Sk, H, Dh, dtype=BF16).transpose(1, 2)
        out, lse = attention_with_lse(q, k, v, kernel=kernel)
        assert out.shape == (B, H, Sq, Dh) and out.dtype == BF16
        assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
        assert attention(q, k, v, kernel=kernel).shape == (B, H, Sq, Dh)
    assert dict(counter.counts.attention_ops) == {TORCH_CUDA_OPS[kernel]: 2}
    assert counter.counts.flops["attention"] == 2 * 4 * B * H * Sq * Sk * Dh


@pytest.mark.parametrize("kernel, keys, expected", [
    (K.TORCH_CUDNN, 1, K.TORCH_FLASH),  # cuDNN refuses s_k == 1 (PyTorch's dispatcher would not pick it)
    (K.TORCH_CUDNN, 2, K.TORCH_CUDNN),
    (K.TORCH_CUDNN, 4096, K.TORCH_CUDNN),
    (K.TORCH_FLASH, 1, K.TORCH_FLASH),
    (K.FLASH_ATTN_3, 1, K.FLASH_ATTN_3),
    (K.CPU_FLASH, 1, K.CPU_FLASH),
])
def test_a_block_with_one_key_never_reaches_cudnn(kernel, keys, expected):
    assert kernel_for_keys(kernel, keys) is expected


def test_a_ring_block_with_one_valid_key_runs_flash_not_cudnn():
    """A ring block holding one valid token (and no text) calls attention with Sk = 1."""
    fake_mode = FakeTensorMode()
    counter = Counter(fake_mode)
    with fake_mode, counter:
        q = torch.empty(1, 9, 3, 64, dtype=BF16, device="cuda").transpose(1, 2)  # [B, H, Sq, Dh]
        k = v = torch.empty(1, 1, 3, 64, dtype=BF16, device="cuda").transpose(1, 2)
        out, lse = attention_with_lse(q, k, v, kernel=K.TORCH_CUDNN)
        assert out.shape == (1, 3, 9, 64) and lse.shape == (1, 3, 9)
        wide = torch.empty(1, 2, 3, 64, dtype=BF16, device="cuda").transpose(1, 2)
        attention_with_lse(q, wide, wide, kernel=K.TORCH_CUDNN)
    assert dict(counter.counts.attention_ops) == {TORCH_CUDA_OPS[K.TORCH_FLASH]: 1, TORCH_CUDA_OPS[K.TORCH_CUDNN]: 1}


def _stand_in_flash_module(monkeypatch, name: str, returns_probs: bool):
    """A module with `flash_attn_func` in flash-attn's layout ([B, S, H, Dh]) computing the
    textbook formula, so the dispatch's transposes and unpacking are checked on CPU."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, return_attn_probs=False):
        calls.append(return_attn_probs)
        out, lse = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).to(q.dtype)  # [B, Sq, H, Dh]
        if not return_attn_probs:
            return out
        return (out, lse.float(), None) if returns_probs else (out, lse.float())

    module = types.ModuleType(name)
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("kernel, module, returns_probs", [
    (K.FLASH_ATTN, "flash_attn", True),  # flash-attn 2: (out, lse, probs)
    (K.FLASH_ATTN_3, "flash_attn_interface", False),  # FlashAttention-3: (out, lse)
])
def test_flash_attn_packages_get_their_layout_and_give_back_ours(monkeypatch, kernel, module, returns_probs):
    calls = _stand_in_flash_module(monkeypatch, module, returns_probs)
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v, kernel=kernel)
    expected_out, expected_lse = reference(q, k, v)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert (out.double() - expected_out).abs().max() < 1e-5
    assert (lse.double() - expected_lse).abs().max() < 1e-5
    assert calls == [True]


def test_math_path_refuses_a_gpu_sized_score_matrix_before_allocating():
    # 24 heads x 14,566^2 fp32 scores (848x480x49 on one rank): 19.0 GiB, on a non-CPU device.
    q = torch.empty(1, 24, 14566, 128, device="meta", dtype=FP64)
    with pytest.raises(RuntimeError, match=r"math path would allocate 19\.0 GiB of scores"):
        attention_with_lse(q, q, q, kernel=K.MATH)
    small = torch.empty(1, 2, 64, 16, device="meta", dtype=FP64)
    assert attention(small, small, small, kernel=K.MATH).shape == small.shape  # tiny sizes still run


def test_xfuser_is_not_a_per_call_kernel():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="replaces the whole sequence-parallel layer"):
        attention(q, k, v, kernel=K.XFUSER)


def test_xfuser_on_one_device_is_refused_with_the_fix():
    video = torch.zeros(1, 4, 2, 8)
    text = torch.zeros(1, 0, 2, 8)
    with pytest.raises(ValueError, match="needs two or more ranks.*use attention_backend=auto on one device"):
        joint_attention(video, video, video, text, text, text, attention_config=AttentionConfig(A.XFUSER))


def test_attention_config_plans_another_device_with_pytorch_stand_ins():
    q = torch.zeros(1, 2, 4, 8, dtype=BF16)
    assert AttentionConfig().kernel(q, need_lse=True) is K.CPU_FLASH
    assert AttentionConfig(installed=HOPPER, device_type="cuda").kernel(q, True) is K.TORCH_CUDNN
    # flash-attn 2/3 are counted as PyTorch's flash kernel on fake CPU tensors (same allocations)
    assert AttentionConfig(installed=FA3_HOPPER, device_type="cuda").kernel(q, True) is K.TORCH_FLASH
    assert AttentionConfig(installed=FA2_AMPERE, device_type="cuda").kernel(q, True) is K.TORCH_FLASH
    assert AttentionConfig("torch").resolved().installed is not None
    with pytest.raises(ValueError, match="device_type='xpu'"):
        AttentionConfig(device_type="xpu")


class _StubContext:
    """Only what the DiT forward reads before any collective: the context's attention config."""

    def __init__(self, attention: AttentionConfig):
        self.attention = attention


def test_dit_forward_refuses_an_attention_config_that_contradicts_its_context():
    with torch.device("meta"):
        model = MochiDiT(DEMO_DIT_CONFIG)
    latent = torch.zeros(1, 12, 1, 4, 4, device="meta")
    features, mask = torch.zeros(1, 3, 4096, device="meta"), torch.ones(1, 3, device="meta")
    with pytest.raises(ValueError, match="differs from the ParallelContext's"):
        model(latent, torch.ones(1, device="meta"), features, mask, ctx=_StubContext(AttentionConfig()),
              attention=AttentionConfig("torch"))


# -- the planner counts the CUDA kernel ---------------------------------------------------------

PLANNED = [InstalledKernels(), HOPPER, TURING, FA2_AMPERE, FA3_HOPPER]
COUNTED_OP = {K.TORCH_FLASH: TORCH_CUDA_OPS[K.TORCH_FLASH], K.TORCH_EFFICIENT: TORCH_CUDA_OPS[K.TORCH_EFFICIENT],
              K.TORCH_CUDNN: TORCH_CUDA_OPS[K.TORCH_CUDNN], K.FLASH_ATTN: TORCH_CUDA_OPS[K.TORCH_FLASH],
              K.FLASH_ATTN_3: TORCH_CUDA_OPS[K.TORCH_FLASH]}


@pytest.mark.parametrize("parallel", [ParallelConfig(1), ParallelConfig(2, 1, 1, 2, num_heads=4)], ids=["one", "ring2"])
@pytest.mark.parametrize("installed", PLANNED, ids=["unknown", "hopper", "turing", "fa2", "fa3"])
def test_planner_counts_the_kernel_choose_backend_returns_for_cuda(installed, parallel):
    step = count_step(parallel, 128, 96, 13, "bf16", config=DEMO_DIT_CONFIG, installed=installed)
    expected = choose_backend("cuda", torch.bfloat16, parallel.ring_degree > 1, "auto", installed)
    assert step.attention_kernel is expected
    assert step.attention_ops == (COUNTED_OP[expected],)


def test_planner_attention_memory_has_no_score_matrix():
    # 848x480x49 on the demo widths: 14,310 video tokens, 4 heads: S x S fp32 scores would be 3.3 GB.
    step = count_step(ParallelConfig(1), 848, 480, 49, "bf16", config=DEMO_DIT_CONFIG, installed=HOPPER)
    tokens = 9 * 30 * 53 + 256
    assert step.attention_kernel is K.TORCH_CUDNN
    assert step.activation_peak_bytes < 0.1 * 4 * tokens**2 * 4


def test_planner_refuses_to_count_xfuser():
    with pytest.raises(ValueError, match="the planner counts fused attention kernels, not xfuser"):
        count_step(ParallelConfig(2, 1, 2, 1, num_heads=4), 128, 96, 13, "bf16", config=DEMO_DIT_CONFIG,
                   attention_backend=A.XFUSER, installed=XFUSER)
