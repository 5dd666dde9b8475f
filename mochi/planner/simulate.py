"""One rank's share of a sampling step, run for real on fake tensors and counted.

The rank runs our own code: `DenoiseLoop.begin()` and `step(0)` (noise, CFG combine and Euler in
fp32) around `MochiDiT.forward` with a real `ParallelContext` whose collectives go to PyTorch's
"fake" process group (no peers, no data; shapes only). So the shard sizes, the Ulysses head
slices, the ring's K/V buffers and the gathers are exactly the code's own.

Depth shortcut: Mochi's blocks 0..46 are identical and nothing but (x, y) flows between them, so
the rank runs a DiT with the full widths and sequence but depth 2 (one regular block and the last,
text-free block). The peak is the same as at depth 48 (blocks run one after another and free their
temporaries); FLOPs and sent bytes of the 46 missing regular blocks are the counted regular block's
times 46. `tests/test_planner.py` checks this against a full-depth run. With a step cache the rank
runs depth 3: the cache keeps the block-stack input (TeaCache) or block 0's output (first-block
cache) alive through the later regular blocks, which depth 2 would not show.

Attention: the rank runs the kernel a CUDA rank would (`kernel.choose_backend("cuda", bf16, ...)`
with the installed kernels given or found here), so memory and FLOPs are the GPU path's, never
the CPU kernel's or an S x S math fallback's.
"""

import functools
import math
import time
from collections import Counter as Tally
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from ..constants import DEFAULT_CFG
from ..dit import DiTConfig, MochiDiT
from ..layers import FP8_MIN_CAPABILITY, Fp8Compute, Linear, fp8_compute, scaled_mm_linear
from ..parallel.config import ParallelConfig
from ..parallel.kernel import AttentionBackend, AttentionConfig, AttentionKernel, InstalledKernels, choose_backend
from ..parallel.kernel_choice import KernelChoice
from ..parallel.layout import ParallelContext
from ..sampler import DenoiseLoop, SampleRequest, latent_shape_for_video
from ..step_cache import StepCacheSpec
from ..text import TextCondition
from .counting import Counter, fake_module

WEIGHT_DTYPES = ("bf16", "fp8")
COMPUTE_DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class StepCount:
    """One rank's counted share of one sampling step (all passes the rank runs).

    Attributes:
        weight_bytes: the full-depth DiT's weights as stored on the rank.
        activation_peak_bytes: peak of everything else alive during the step (latent state,
            activations, communication buffers; fp8: the activations' fp8 copies on the `_scaled_mm`
            path, transient fp8 -> bf16 weight casts on the cast path).
        flops: FLOPs by kind ("linear", "conv", "attention") for the rank, full depth.
        sent_bytes: bytes the rank sends, by collective ("all_to_all", "all_gather", "send").
        seconds: wall time of the fake run (for keeping the planner fast).
        attention_kernel: the kernel a CUDA rank runs (`kernel.choose_backend`), the one counted.
        attention_ops: the aten attention ops the counted run called (flash-attn 2/3 are counted
            as PyTorch's flash kernel, which allocates the same).
    """

    weight_bytes: int
    activation_peak_bytes: int
    flops: Tally
    sent_bytes: Tally
    seconds: float
    attention_kernel: AttentionKernel
    attention_ops: tuple[str, ...]

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_peak_bytes

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


def weight_bytes(config: DiTConfig, weight_dtype: str) -> int:
    """Stored bytes of a full DiT: bf16 everywhere, or fp8 Linear weights (1 byte, plus a fp32 scale
    each; ComfyUI `fp8_scaled` layout, what `checkpoint.load_dit(weight_dtype="fp8")` builds) with
    everything else bf16. Counted from a meta-device model, nothing allocated."""
    _check_weight_dtype(weight_dtype)
    with torch.device("meta"):
        model = MochiDiT(config)
    total = 0
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if weight_dtype == "fp8" and isinstance(module, Linear) and param_name == "weight":
                total += param.numel() * 1 + 4  # fp8 weight + fp32 scale_weight
            else:
                total += param.numel() * 2
    return total


def _check_weight_dtype(weight_dtype: str) -> None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r}; the planner knows {', '.join(WEIGHT_DTYPES)}")


class _SimulatedContext(ParallelContext):
    """A real ParallelContext whose groups live in the fake process group (`_fake_world`)."""

    def _new_groups(self, rank_lists, timeout, keep_single: bool = False):
        mine, my_ranks = None, None
        for ranks in rank_lists:
            group = dist.new_group(ranks) if len(ranks) > 1 or keep_single else None  # the default ("fake") backend
            if group is not None:
                self._groups.append(group)
            if self.rank in ranks:
                mine, my_ranks = group, ranks
        return mine, my_ranks


@contextmanager
def _fake_world(world_size: int, rank: int):
    """A default process group of `world_size` ranks, this process being `rank`, with no peers:
    PyTorch's fake backend completes every collective at once without touching data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError(
            "the planner simulates ranks with its own fake process group and cannot run in a process "
            "that already has one; call it before torch.distributed.init_process_group (e.g. in the driver)"
        )
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


class _MaskAwareModel:
    """Calls the DiT, telling the counter how many text tokens the given mask keeps (fake tensors
    cannot count a mask's ones). Also the step cache's entry points (`step_cache.StepCache`)."""

    def __init__(self, model, counter: Counter, valid_tokens: dict[int, int]):
        self.model, self.counter, self.valid_tokens = model, counter, valid_tokens

    def parameters(self):
        return self.model.parameters()

    def __call__(self, latent, sigma, features, mask, ctx=None, attention=None):
        self.counter.mask_true = self.valid_tokens[id(mask)]
        return self.model(latent, sigma, features, mask, ctx=ctx, attention=attention)

    def embed(self, latent, sigma, features, mask, ctx=None, rope=None, attention=None):
        self.counter.mask_true = self.valid_tokens[id(mask)]
        return self.model.embed(latent, sigma, features, mask, ctx=ctx, rope=rope, attention=attention)

    def first_block_modulated_input(self, state):
        return self.model.first_block_modulated_input(state)

    def run_blocks(self, state, start, stop, ctx=None):
        return self.model.run_blocks(state, start, stop, ctx=ctx)

    def head(self, state, ctx=None):
        return self.model.head(state, ctx=ctx)


def _block_deltas(model: MochiDiT, counter: Counter, depth: int):
    """Hooks that add (depth - sim depth) x block 0's FLOPs and sent bytes: the sim model's regular
    blocks stand in for all depth - 1 of them. Returns (extra_flops, extra_sent, handles)."""
    extra_flops, extra_sent = Tally(), Tally()
    before = {}
    regular = model.blocks[0]
    copies = depth - len(model.blocks)

    def pre(module, args, kwargs=None):
        before["flops"] = Tally(counter.counts.flops)
        before["sent"] = Tally(counter.counts.sent_bytes)

    def post(module, args, output):
        for kind, value in counter.counts.flops.items():
            extra_flops[kind] += copies * (value - before["flops"].get(kind, 0))
        for kind, value in counter.counts.sent_bytes.items():
            extra_sent[kind] += copies * (value - before["sent"].get(kind, 0))

    handles = [regular.register_forward_pre_hook(pre), regular.register_forward_hook(post)]
    return extra_flops, extra_sent, handles


@functools.lru_cache(maxsize=256)
def count_step(
    parallel: ParallelConfig,
    width: int,
    height: int,
    frames: int,
    weight_dtype: str = "bf16",
    text_tokens: int = 256,
    use_cfg: bool = True,
    config: DiTConfig = DiTConfig(),
    full_depth: bool = False,
    cache: StepCacheSpec | None = None,
    attention_backend: AttentionBackend = AttentionBackend.AUTO,
    installed: InstalledKernels | None = None,
) -> StepCount:
    """Count one sampling step on global rank 0 of `parallel` (the conditional branch, the first
    sequence shard: the largest share when the sequence is padded).

    With a step cache the counted step is the first one, which computes every block and fills the
    cache: the peak includes the cached residual and previous indicator of each branch this rank
    runs (shard-sized, compute dtype) and the block-stack input kept for the residual. Later steps
    that compute have the same peak (old residuals are dropped before new ones are made); skipped
    steps have a lower one. FLOPs are those of a computed step.

    Args:
        parallel: degrees (world_size = cfg x ulysses x ring).
        width, height, frames: video size (multiples of 16; frames = 6k + 1).
        weight_dtype: "bf16" or "fp8" (Linear weights in float8 with a per-tensor scale). fp8 counts
            the `_scaled_mm` path (an fp8 copy of each Linear's input) on GPUs with fp8 tensor cores,
            and when `installed` names no GPU; the cast path (a bf16 copy of each weight) on older ones.
        text_tokens: valid tokens of the positive prompt (the negative prompt is empty).
        use_cfg: False counts the cfg = 1 case (no unconditional pass).
        config: DiT size (the full 10B model by default).
        full_depth: run all `config.depth` blocks instead of the depth-2 shortcut (slower).
        cache: a `step_cache.StepCacheSpec` to count the cache's memory, or None.
        attention_backend: the backend the ranks are asked for (xfuser is not counted: it replaces
            our USP layer).
        installed: what the ranks have (default: what this process finds, `InstalledKernels.detect()`).

    Returns:
        StepCount (cached per argument set).
    """
    _check_weight_dtype(weight_dtype)
    installed = InstalledKernels.detect() if installed is None else installed
    kernel = choose_backend("cuda", COMPUTE_DTYPE, parallel.ring_degree > 1, attention_backend, installed)
    if kernel in (AttentionKernel.MATH, AttentionKernel.XFUSER):
        raise ValueError(
            f"the planner counts fused attention kernels, not {kernel.value} (the math path would hold S x S "
            "scores; xfuser replaces our USP layer); plan with attention_backend=auto"
        )
    attention = AttentionConfig(attention_backend, installed, device_type="cuda")
    if parallel.cfg_degree == 2 and not use_cfg:
        raise ValueError("cfg_degree 2 needs use_cfg=True (the second CFG rank runs the unconditional branch)")
    latent_shape = latent_shape_for_video(width, height, frames)
    started = time.perf_counter()
    sim_depth = 2 if cache is None else 3
    sim_config = config if full_depth or config.depth <= sim_depth else replace(config, depth=sim_depth)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_module(lambda: MochiDiT(sim_config), fake_mode, COMPUTE_DTYPE)
    if weight_dtype == "fp8":
        scaled_mm = fp8_compute("cuda", installed.cuda_capability or FP8_MIN_CAPABILITY, FP8) is Fp8Compute.SCALED_MM
        with fake_mode:
            for module in model.modules():
                if isinstance(module, Linear):
                    module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, dtype=FP8), requires_grad=False)
                    module.scale_weight = torch.ones((), dtype=torch.float32)
                    if scaled_mm:
                        module.forward = functools.partial(_scaled_mm_forward, module)

    # Real (tiny) text conditions: the request validates them; the forward only reads shapes.
    positive = TextCondition(torch.zeros(1, 256, 4096), torch.ones(1, 256, dtype=torch.int64))
    negative = TextCondition.empty(256)
    request = SampleRequest(positive, negative, latent_shape=latent_shape, steps=2, cfg=DEFAULT_CFG if use_cfg else 1.0,
                            cache=cache)
    counter = Counter(fake_mode)
    wrapped = _MaskAwareModel(model, counter, {id(positive.mask): min(text_tokens, 256), id(negative.mask): 0})
    if sim_config.depth < config.depth:
        extra_flops, extra_sent, handles = _block_deltas(model, counter, config.depth)
    else:
        extra_flops, extra_sent, handles = Tally(), Tally(), []

    world = parallel.world_size
    with _fake_world(world, 0) if world > 1 else _nullcontext():
        ctx = _SimulatedContext(parallel, attention=attention) if world > 1 else None
        try:
            with fake_mode, torch.no_grad(), counter:
                loop = DenoiseLoop(wrapped, request, ctx=ctx, compute_dtype=COMPUTE_DTYPE, device="cpu",
                                   attention=KernelChoice(attention))  # the guess: fake tensors are not timed
                loop.begin()
                loop.step(0)
                del loop
        finally:
            for handle in handles:
                handle.remove()
            if ctx is not None:
                ctx.close()
    counts = counter.counts
    return StepCount(
        weight_bytes=weight_bytes(config, weight_dtype),
        activation_peak_bytes=counts.peak_bytes,
        flops=counts.flops + extra_flops,
        sent_bytes=counts.sent_bytes + extra_sent,
        seconds=time.perf_counter() - started,
        attention_kernel=kernel,
        attention_ops=tuple(sorted(counts.attention_ops)),
    )


def _scaled_mm_forward(module: Linear, x: torch.Tensor) -> torch.Tensor:
    """What an fp8 Linear runs on a GPU with fp8 tensor cores (`layers.fp8_compute` picks it from the
    device, which here is the fake tensors' CPU): the fp8 copy of x and `_scaled_mm`, counted as such."""
    if fp8_compute("cuda", FP8_MIN_CAPABILITY, module.weight.dtype, x.dtype, module.in_features,
                   module.out_features) is Fp8Compute.CAST:
        return Linear.forward(module, x)
    return scaled_mm_linear(x, module.weight, module.scale_weight, module.bias)


@contextmanager
def _nullcontext():
    yield


@dataclass(frozen=True)
class DecodeCount:
    """One rank's counted tiled VAE decode of a whole video.

    Attributes:
        weight_bytes: decoder weights (bf16).
        activation_peak_bytes: peak while decoding one tile (activations, carried causal context,
            the tile's output buffer; the latent on the rank included).
        flops: FLOPs of decoding every tile of the plan (one rank doing all of them).
        tiles: number of tiles in the plan.
        spec: the TileSpec used.
        seconds: wall time of the fake run.
    """

    weight_bytes: int
    activation_peak_bytes: int
    flops: Tally
    tiles: int
    spec: object
    seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_peak_bytes

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


@functools.lru_cache(maxsize=64)
def count_tiled_decode(width: int, height: int, frames: int, spec=None, config=None) -> DecodeCount:
    """Count `vae_tiling.decode_tile` at full width and height on fake tensors, bf16 (as GPU ranks
    decode), and scale to the whole video.

    Shortcuts, both exact for this decoder:
    - Time: after the first chunk every temporal chunk is the same computation (causal context is
      carried, not recomputed), so the tile is decoded for two chunks (the first and one steady
      one). The peak is the steady chunk's plus the difference in the tile's output buffer and the
      latent between the short and the real video (both alive throughout); FLOPs are the first
      chunk's plus the steady chunk's per latent frame for the remaining frames.
    - Space: tiles of one plan have the same size except where the grid is smaller than a tile;
      the largest tile is decoded and FLOPs are scaled by each tile's area (convolutions: FLOPs
      proportional to pixels). A rank decodes one tile at a time (`RankWorker.decode_tiles` moves
      each result to the CPU), so the peak is one tile's.

    Args:
        width, height, frames: video size.
        spec: a `vae_tiling.TileSpec` (default: TileSpec(), what a user gets without tuning).
        config: VAEDecoderConfig (default: the real decoder).
    """
    from ..vae import MochiVAEDecoder, VAEDecoderConfig
    from ..vae_tiling import TileSpec, decode_tile, plan_tiles

    spec = TileSpec() if spec is None else spec
    config = VAEDecoderConfig() if config is None else config
    started = time.perf_counter()
    shape = latent_shape_for_video(width, height, frames)
    T = shape[2]
    chunk = spec.frame_chunk
    T_sim = min(T, 2 * chunk)
    sim_shape = shape[:2] + (T_sim,) + shape[3:]
    tiles = plan_tiles(shape, spec)
    area = lambda tile: (tile.rows[1] - tile.rows[0]) * (tile.cols[1] - tile.cols[0])  # noqa: E731
    largest = max(tiles, key=area)
    fake_mode = FakeTensorMode()
    decoder = fake_module(lambda: MochiVAEDecoder(config), fake_mode, COMPUTE_DTYPE)
    counter = Counter(fake_mode)
    chunk_flops: list[tuple[int, int]] = []  # (latent frames, FLOPs) per decode_chunk call
    decode_chunk = decoder.decode_chunk

    def counted_chunk(latent, carried=None):
        before = counter.counts.total_flops
        result = decode_chunk(latent, carried)
        chunk_flops.append((latent.shape[2], counter.counts.total_flops - before))
        return result

    decoder.decode_chunk = counted_chunk  # this instance only; decode_tile calls it per chunk
    with fake_mode, torch.no_grad(), counter:
        latent = torch.empty(sim_shape, dtype=COMPUTE_DTYPE)
        pixels = decode_tile(decoder, latent, largest)
        del pixels, latent
    item = torch.empty((), dtype=COMPUTE_DTYPE).element_size()
    h, w = largest.rows[1] - largest.rows[0], largest.cols[1] - largest.cols[0]
    s = config.spatial_compression
    out_pixels = config.out_channels * h * s * w * s
    grow = item * (out_pixels * (config.video_frames(T) - config.video_frames(T_sim)) + math.prod(shape) - math.prod(sim_shape))
    first_frames, first_flops = chunk_flops[0]
    tile_flops = first_flops
    if len(chunk_flops) > 1:
        steady_frames, steady_flops = chunk_flops[1]
        tile_flops += steady_flops * (T - first_frames) // steady_frames
    scale = sum(area(tile) for tile in tiles) / area(largest)
    kinds = counter.counts.flops
    total = sum(kinds.values()) or 1
    flops = Tally({kind: int(tile_flops * scale * value / total) for kind, value in kinds.items()})
    weights = sum(t.numel() * t.element_size() for t in decoder.parameters())
    peak = counter.counts.peak_bytes + grow
    return DecodeCount(weights, peak, flops, len(tiles), spec, time.perf_counter() - started)


@dataclass(frozen=True)
class EncodeCount:
    """One rank's counted tiled VAE encode of a whole video.

    Attributes:
        weight_bytes: encoder weights (bf16).
        activation_peak_bytes: peak while encoding one tile (activations and the tile's latent;
            the video on the rank included).
        tiles: number of tiles in the plan.
        spec: the EncodeTileSpec used.
        seconds: wall time of the fake run.
    """

    weight_bytes: int
    activation_peak_bytes: int
    tiles: int
    spec: object
    seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_peak_bytes


@functools.lru_cache(maxsize=64)
def count_tiled_encode(width: int, height: int, frames: int, spec=None, config=None) -> EncodeCount:
    """Count `vae_encoder_tiling.encode_tile` on fake tensors, bf16, for the largest tile of the
    plan and every frame (the encoder's attention spans all frames, so time is not shortened).

    Args:
        width, height, frames: video size (frames 6k + 1).
        spec: an `EncodeTileSpec` (default: EncodeTileSpec()).
        config: VAEEncoderConfig (default: the real encoder).
    """
    from ..vae_encoder import MochiVAEEncoder, VAEEncoderConfig
    from ..vae_encoder_tiling import EncodeTileSpec, encode_tile, plan_encode_tiles

    spec = EncodeTileSpec() if spec is None else spec
    config = VAEEncoderConfig() if config is None else config
    started = time.perf_counter()
    shape = (1, config.in_channels, frames, height, width)
    tiles = plan_encode_tiles(shape, spec, config)
    area = lambda tile: (tile.rows[1] - tile.rows[0]) * (tile.cols[1] - tile.cols[0])  # noqa: E731
    largest = max(tiles, key=area)
    fake_mode = FakeTensorMode()
    encoder = fake_module(lambda: MochiVAEEncoder(config), fake_mode, COMPUTE_DTYPE)
    counter = Counter(fake_mode)
    with fake_mode, torch.no_grad(), counter:
        video = torch.empty(shape, dtype=COMPUTE_DTYPE)
        latent = encode_tile(encoder, video, largest)
        del latent, video
    weights = sum(t.numel() * t.element_size() for t in encoder.parameters())
    return EncodeCount(weights, counter.counts.peak_bytes, len(tiles), spec, time.perf_counter() - started)
