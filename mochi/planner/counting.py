"""Count FLOPs, peak memory and communicated bytes by running our real modules on fake tensors.

`Counter` is a `TorchDispatchMode` that sits above a `FakeTensorMode`: every aten op the model
runs passes through it with fake (shape-only) tensors, so a 10B-parameter forward at full video
size takes seconds and no memory. It records

- FLOPs of matmuls (mm, addmm, bmm, baddbmm, fp8 _scaled_mm: 2 x M x K x N), convolutions (2 x outputs x
  C_in/groups x kernel volume) and attention kernels (4 x Sq x Sk x Dh x heads, the two matmuls
  inside a flash kernel). Elementwise ops are not counted (they are memory-bound, < 1 %).
- Live bytes of every tensor storage an op creates, freed when the last tensor using it dies
  (weakref finalisers, keyed by storage), and the peak. This is what a caching allocator must
  hold at least; fragmentation and the CUDA context come on top (`plan.py` adds a reserve).
- Bytes this rank sends in each c10d collective (all-to-all, all-gather, send).

Attention is accounted as the GPU kernel allocates it: the planner asks `kernel.choose_backend`
for device "cuda" and runs that PyTorch kernel (`aten._scaled_dot_product_{flash,efficient,
cudnn}_attention`) on the fake tensors; its fake implementation allocates only the output and the
log-sum-exp (no S x S matrix), what flash-attn allocates too. A plain CPU forward on fake tensors
runs `aten._scaled_dot_product_flash_attention_for_cpu`, which allocates the same.

Data-dependent shapes: the DiT packs valid text tokens with a boolean mask, which fake tensors
cannot evaluate. The counter substitutes an index of `mask_true` entries (the planner passes the
number of valid text tokens), so the rest of the forward sees the same shapes as a real run.
"""

import weakref
from collections import Counter as Tally
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._scaled_mm.default}
_CONVS = {aten.convolution.default}
# Fused attention kernels: q [B, H, Sq, Dh], k [B, H, Sk, Dh] (first three args).
_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _matmul_flops(func, args) -> int:
    if func in (aten.mm.default, aten._scaled_mm.default):
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if func is aten.addmm.default:
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    a, b = (args[0], args[1]) if func is aten.bmm.default else (args[1], args[2])
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv_flops(args, out: torch.Tensor) -> int:
    weight = args[1]
    kernel_volume = 1
    for size in weight.shape[2:]:
        kernel_volume *= size
    return 2 * out.numel() * (weight.shape[1] * kernel_volume)  # weight: [C_out, C_in/groups, k...]


def _attention_flops(args) -> int:
    q, k = args[0], args[1]
    B, H, Sq, Dh = q.shape
    return 4 * B * H * Sq * k.shape[-2] * Dh


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@dataclass
class Counts:
    """What one counted run did.

    Attributes:
        flops: FLOPs by kind ("linear", "conv", "attention").
        peak_bytes: highest live bytes of tensors created during the run (weights excluded unless
            they were created inside it).
        end_bytes: live bytes at the end of the run.
        sent_bytes: bytes this rank sent, by collective ("all_to_all", "all_gather", "send").
        attention_ops: calls per attention kernel op (e.g. "aten._scaled_dot_product_flash_attention").
    """

    flops: Tally = field(default_factory=Tally)
    peak_bytes: int = 0
    end_bytes: int = 0
    sent_bytes: Tally = field(default_factory=Tally)
    attention_ops: Tally = field(default_factory=Tally)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


class Counter(TorchDispatchMode):
    """Dispatch mode that counts FLOPs, live/peak bytes and sent bytes (see the module docstring).

    Args:
        fake_mode: the FakeTensorMode the tensors belong to (used to make substitute indices).
        mask_true: how many entries of any boolean index mask are treated as True (valid text
            tokens); None raises on boolean indexing instead.
    """

    def __init__(self, fake_mode: FakeTensorMode | None = None, mask_true: int | None = None, explain: bool = False):
        super().__init__()
        self.fake_mode = fake_mode
        self.mask_true = mask_true
        self.explain = explain
        self.peak_tensors: list[tuple[int, str, tuple, torch.dtype]] = []  # with explain: live at the peak
        self._origin: dict[int, tuple[str, tuple, torch.dtype]] = {}
        self.counts = Counts()
        self._live = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [nbytes, live tensors]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.index.Tensor:
            args = (args[0], [self._substitute_mask(i) for i in args[1]])
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        inputs = None
        for tensor in _tensors(out):
            if tensor.untyped_storage()._cdata not in self._storages:
                if inputs is None:  # views and in-place results share an input's storage: not new
                    inputs = {t.untyped_storage()._cdata for t in _tensors(list(args) + list(kwargs.values()))}
                if tensor.untyped_storage()._cdata in inputs:
                    continue
            self._track(tensor, func)
        return out

    def _substitute_mask(self, index):
        if index is None or index.dtype != torch.bool or not isinstance(index, FakeTensor):
            return index  # real masks index for real
        if self.mask_true is None or self.fake_mode is None:
            raise ValueError("boolean indexing on fake tensors needs Counter(fake_mode, mask_true=<count>)")
        if index.dim() != 1:
            raise ValueError(f"only 1-D boolean masks are supported by the counter, got shape {tuple(index.shape)}")
        with self.fake_mode:
            return torch.zeros(min(self.mask_true, index.shape[0]), dtype=torch.long, device=index.device)

    def _count(self, func, args, kwargs, out) -> None:
        counts = self.counts
        if func in _MATMULS:
            counts.flops["linear"] += _matmul_flops(func, args)
        elif func in _CONVS:
            counts.flops["conv"] += _conv_flops(args, out)
        elif func in _ATTENTION:
            counts.flops["attention"] += _attention_flops(args)
            counts.attention_ops[str(func.overloadpacket)] += 1
        elif func.namespace == "c10d":
            name = func._opname
            if name.startswith("alltoall"):
                # (output, input, process_group, output_split_sizes, input_split_sizes, ...)
                counts.sent_bytes["all_to_all"] += _alltoall_sent(args[1], _group_size(args[2]))
            elif name.startswith("allgather") or name.startswith("_allgather"):
                # (outputs, inputs, process_group, ...): every input goes to the other ranks
                inputs = list(_tensors(args[1]))
                world = _group_size(args[2])
                counts.sent_bytes["all_gather"] += (world - 1) * sum(t.numel() * t.element_size() for t in inputs)
            elif name.startswith("send"):
                counts.sent_bytes["send"] += sum(t.numel() * t.element_size() for t in _tensors(args[0]))

    def _track(self, tensor: torch.Tensor, func) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self._live += entry[0]
            if self.explain:
                self._origin[key] = (str(func), tuple(tensor.shape), tensor.dtype)
            if self._live > self.counts.peak_bytes:
                self.counts.peak_bytes = self._live
                if self.explain:
                    self.peak_tensors = sorted(
                        ((e[0], *self._origin[k]) for k, e in self._storages.items()), key=lambda t: -t[0]
                    )
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self._live -= entry[0]
            del self._storages[key]

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self.counts.end_bytes = self._live
        return result


def _group_size(group) -> int:
    """World size of the process group a c10d op received (a boxed TorchScript object)."""
    import torch.distributed as dist

    return dist.ProcessGroup.unbox(group).size()


def _alltoall_sent(tensor: torch.Tensor, world: int) -> int:
    """Bytes leaving this rank in an even all_to_all_single: (world - 1)/world of the input."""
    return tensor.numel() * tensor.element_size() * (world - 1) // world


def fake_module(module_fn, fake_mode: FakeTensorMode, dtype: torch.dtype) -> nn.Module:
    """Build `module_fn()` without allocating its weights: on the meta device in `dtype`, then
    every parameter and buffer replaced by a fake tensor of the same shape (device cpu).

    Building straight under FakeTensorMode also works but runs every initialiser (seconds for
    10B parameters); meta construction skips the work.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = module_fn()
    finally:
        torch.set_default_dtype(previous)
    with fake_mode:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=False)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return module
