"""Mochi-1's causal video VAE decoder (genmo `Decoder` semantics), any size.

Module attributes carry genmo's checkpoint key names (`blocks.0.0`, `blocks.N.blocks.J.stack.K`,
`blocks.N.proj`, `output_proj`), so genmo's `decoder.safetensors` and the `decoder.`-stripped
half of ComfyUI's `mochi_vae.safetensors` load without renaming. `VAEDecoderConfig.from_shapes`
reads every width and depth from the tensor shapes, so a tiny test file and the real one go
through the same code.

Structure (real sizes; widths ``channels = 128 * [1, 2, 4, 6]`` from finest to coarsest):

    blocks.0     1x1x1 conv 12 -> 768, then 3 ResBlocks at 768           (latent grid, T frames)
    blocks.1     6 ResBlocks at 768, proj -> 512 * 3 * 2 * 2, depth-to-space-time: 3x time, 2x space
    blocks.2     4 ResBlocks at 512, proj -> 256 * 2 * 2 * 2, 2x time, 2x space
    blocks.3     3 ResBlocks at 256, proj -> 128 * 1 * 2 * 2, 2x space
    blocks.4     3 ResBlocks at 128
    output_proj  SiLU, then Linear 128 -> 3 over channels                  (6T - 5 frames, 8x space)

ResBlock: ``x + conv(silu(norm(conv(silu(norm(x))))))`` with 3x3x3 causal convs and GroupNorm
applied to each frame separately. Causal conv: the input is padded by replicating its edges,
2 frames in front (none behind) and 1 pixel on each spatial side. Depth-to-space-time with a
temporal expansion e > 1 drops the first e - 1 frames it makes, so T latent frames become
3T - 2 and then 6T - 5 video frames.

That drop happens inside each upsampling block, as genmo and ComfyUI do, before the next causal
convs see the frames. Released diffusers (`AutoencoderKLMochi`, checked in 0.42) keeps those
frames through the later blocks and drops 5 frames only at the very end, which changes the first
frames' values (see tests/test_vae_matches_diffusers.py). The checkpoint was trained with
genmo's order, so we follow genmo.

Temporal chunking is exact: GroupNorm statistics are per frame, and every causal conv's only
link between frames is the two frames in front of it. `decode_chunk` returns those frames as a
`CausalContext`; feeding it to the next chunk continues the sequence as if it were one call.

The output is the raw decoder output, nominally in [-1, 1]; like genmo's and diffusers' decoder
we do not clamp (clamp when converting to an image).

Nothing in the hot path reads tensor values (no `.item()`, no data-dependent branches), so the
decoder runs on meta / fake tensors for memory accounting.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Linear

NORM_GROUPS = 32  # GroupNorm groups of the real decoder (genmo `norm_fn`)
NORM_EPS = 1e-5  # torch's GroupNorm default, which genmo and diffusers use
SPATIAL_EXPANSION = 2  # every upsampling block doubles height and width (not visible in shapes)


def default_norm_groups(channels: tuple[int, ...]) -> int:
    """GroupNorm groups for a decoder with these widths: gcd(32, *channels).

    The group count is not stored in a checkpoint (GroupNorm weights are [C]), so it is a rule of
    the widths: the real decoder (128, 256, 512, 768) gets genmo's 32; a tiny test decoder gets
    the largest divisor of 32 that divides all its widths (16 for (16, 32, 64, 96), 8 for widths
    that are multiples of 8 but not 16). Files written by `random_vae_state_dict` follow it.
    """
    return math.gcd(NORM_GROUPS, *channels)


@dataclass(frozen=True)
class VAEDecoderConfig:
    """Size of a Mochi VAE decoder. Defaults are the real decoder.

    Lists run from the finest (output) level to the coarsest (latent) level, as in genmo's
    constructor (`base_channels * channel_multipliers`, `num_res_blocks`, `temporal_expansions`).

    Args:
        channels: widths per level, finest first; real (128, 256, 512, 768).
        num_res_blocks: ResBlocks per block, finest first, one more entry than `channels`:
            entry 0 is the last block (`blocks.{n+1}`), entry i in 1..n-1 the upsampling block
            working at width channels[i] (`blocks.{n-i}`), the last entry the first block
            (`blocks.0`). Real (3, 3, 4, 6, 3).
        temporal_expansions: time factor of each upsampling block, finest first; real (1, 2, 3),
            so `blocks.1` triples time and `blocks.2` doubles it.
        latent_channels: 12.
        out_channels: 3 (RGB).
        norm_groups: GroupNorm groups; must divide every width (see `default_norm_groups`).
    """

    channels: tuple[int, ...] = (128, 256, 512, 768)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    latent_channels: int = 12
    out_channels: int = 3
    norm_groups: int = NORM_GROUPS

    def __post_init__(self):
        levels = len(self.channels)
        if levels < 2:
            raise ValueError(f"a Mochi VAE decoder needs at least 2 channel levels, got {self.channels}")
        if len(self.num_res_blocks) != levels + 1:
            raise ValueError(
                f"num_res_blocks={self.num_res_blocks} needs {levels + 1} entries for {levels} "
                f"channel levels {self.channels}"
            )
        if len(self.temporal_expansions) != levels - 1:
            raise ValueError(
                f"temporal_expansions={self.temporal_expansions} needs {levels - 1} entries (one per "
                f"upsampling block) for channel levels {self.channels}"
            )
        if any(e < 1 for e in self.temporal_expansions):
            raise ValueError(f"temporal_expansions must be >= 1, got {self.temporal_expansions}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} does not divide the widths {bad}; use "
                f"default_norm_groups({self.channels}) = {default_norm_groups(self.channels)}"
            )

    @property
    def num_up_blocks(self) -> int:
        return len(self.channels) - 1

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along height and width (8 for the real decoder)."""
        return SPATIAL_EXPANSION**self.num_up_blocks

    @property
    def temporal_compression(self) -> int:
        """Product of the temporal expansions (6 for the real decoder)."""
        return math.prod(self.temporal_expansions)

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from T latent frames: each expansion e maps f frames to e * (f - 1) + 1,
        so 6T - 5 for the real decoder."""
        return self.temporal_compression * (latent_frames - 1) + 1

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "VAEDecoderConfig":
        """Infer the size from tensor shapes keyed by genmo names (no `decoder.` prefix).

        Widths come from the conv / proj shapes, depths from counting ResBlocks, each upsampling
        block's temporal expansion from its proj width / (next width x 2 x 2). GroupNorm groups
        follow `default_norm_groups`.

        Raises KeyError for a missing key; the checkpoint loader turns that into a message about
        what the file looks like.
        """

        def count(prefix: str, start: int = 0) -> int:
            n = start
            while f"{prefix}.{n}.stack.0.weight" in shapes:
                n += 1
            return n - start

        top_width, latent_channels = shapes["blocks.0.0.weight"][:2]
        first_res_blocks = count("blocks.0", start=1)
        num_up = 0
        while f"blocks.{num_up + 1}.proj.weight" in shapes:
            num_up += 1
        if num_up == 0 or f"blocks.{num_up + 1}.blocks.0.stack.0.weight" in shapes:
            # An upsampling block without its proj (or none at all): name the missing key.
            raise KeyError(f"blocks.{num_up + 1}.proj.weight")
        out_channels, finest_width = shapes["output_proj.weight"]
        last_res_blocks = count(f"blocks.{num_up + 1}")

        # Walk the upsampling blocks coarse -> fine: block i maps width in_i to width out_i.
        widths = [top_width]  # coarsest first for now
        up_res_blocks, expansions = [], []
        for i in range(1, num_up + 1):
            proj_out, proj_in = shapes[f"blocks.{i}.proj.weight"]
            if proj_in != widths[-1]:
                raise ValueError(
                    f"blocks.{i}.proj takes {proj_in} channels but the previous block makes {widths[-1]}"
                )
            out_width = shapes[f"blocks.{i + 1}.proj.weight"][1] if i < num_up else finest_width
            factor, rem = divmod(proj_out, out_width * SPATIAL_EXPANSION**2)
            if rem or factor < 1:
                raise ValueError(
                    f"blocks.{i}.proj makes {proj_out} channels, not a multiple of {out_width} x "
                    f"{SPATIAL_EXPANSION}x{SPATIAL_EXPANSION}: not a Mochi upsampling block"
                )
            widths.append(out_width)
            up_res_blocks.append(count(f"blocks.{i}.blocks"))
            expansions.append(factor)

        channels = tuple(reversed(widths))
        return cls(
            channels=channels,
            num_res_blocks=(last_res_blocks, *reversed(up_res_blocks), first_res_blocks),
            temporal_expansions=tuple(reversed(expansions)),
            latent_channels=latent_channels,
            out_channels=out_channels,
            norm_groups=default_norm_groups(channels),
        )


class CausalContext:
    """The frames each causal conv carries from one temporal chunk into the next.

    Build it with the list `decode_chunk` returned for the previous chunk, or with None for the
    first chunk (then convs replicate their first frame, and depth-to-space-time drops its
    leading frames, exactly as in a full decode). Convs call `previous` then `exchange` in a fixed
    order, so the i-th saved tensor belongs to the i-th conv. The carried list is consumed: each
    entry is set to None once its conv has read it, so old and new context never coexist in full.
    """

    def __init__(self, carried: list[torch.Tensor | None] | None):
        self.first_chunk = carried is None
        self.carried = carried
        self.saved: list[torch.Tensor] = []

    def exchange(self, tail: torch.Tensor) -> None:
        """Record the last input frames of the conv that is running now (a copy, so the conv's
        full input can be freed)."""
        self.saved.append(tail.clone())

    def previous(self) -> torch.Tensor | None:
        """Frames in front of the current chunk for the conv that is about to run."""
        if self.carried is None:
            return None
        i = len(self.saved)
        front, self.carried[i] = self.carried[i], None
        return front


def causal_replicate_pad(x: torch.Tensor, front: torch.Tensor | None, time_pad: int, space_pad: int) -> torch.Tensor:
    """Pad for a causal conv in one allocation.

    Args:
        x: [B, C, T, H, W].
        front: [B, C, time_pad, H, W] frames that precede x (the previous chunk), or None to
            replicate x's first frame (genmo's causal padding at the start of the video).
        time_pad, space_pad: frames in front; pixels on each spatial side (replicated edges).

    Returns:
        [B, C, time_pad + T, H + 2 space_pad, W + 2 space_pad], equal to
        F.pad(cat([front, x]), (p, p, p, p, 0, 0), mode="replicate").
    """
    B, C, T, H, W = x.shape
    p = space_pad
    out = x.new_empty(B, C, time_pad + T, H + 2 * p, W + 2 * p)
    body = out[:, :, :, p : p + H, p : p + W]
    body[:, :, time_pad:] = x
    if time_pad:
        body[:, :, :time_pad] = x[:, :, :1] if front is None else front
    if p:
        out[:, :, :, :p, p : p + W] = out[:, :, :, p : p + 1, p : p + W]  # top rows
        out[:, :, :, p + H :, p : p + W] = out[:, :, :, p + H - 1 : p + H, p : p + W]  # bottom rows
        out[:, :, :, :, :p] = out[:, :, :, :, p : p + 1]  # left columns, corners included
        out[:, :, :, :, p + W :] = out[:, :, :, :, p + W - 1 : p + W]  # right columns
    return out


class FrameGroupNorm(nn.Module):
    """GroupNorm over (channels in group, H, W) of each frame separately (genmo
    `GroupNormSpatial`). torch's group_norm accumulates statistics in fp32 for bf16 / fp16 inputs;
    the output keeps the input's dtype."""

    def __init__(self, channels: int, groups: int, eps: float = NORM_EPS):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # [B*T, C, H, W], one copy
        out = F.group_norm(frames, self.groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return out.reshape(B, T, C, H, W).transpose(1, 2)  # [B, C, T, H, W] view, frame-major memory


class CausalConv3d(nn.Module):
    """3x3x3 conv, causal in time, replicate padding (genmo `ContextParallelConv3d`).

    Parameters are named like nn.Conv3d's (`weight` [C_out, C_in, 3, 3, 3], `bias`) so the
    checkpoint keys `...stack.2.weight` load directly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.time_pad = kernel_size - 1
        self.space_pad = (kernel_size - 1) // 2

    def forward(self, x: torch.Tensor, context: CausalContext) -> torch.Tensor:
        B, C, T, H, W = x.shape
        t, s = self.time_pad, self.space_pad
        padded = causal_replicate_pad(x, context.previous(), t, s)  # [B, C, t + T, H + 2s, W + 2s]
        # The next chunk needs the last t frames of the time-padded input, without the space padding.
        context.exchange(padded[:, :, T:, s : s + H, s : s + W])  # [B, C, t, H, W]
        return F.conv3d(padded, self.weight.to(x.dtype), self.bias.to(x.dtype))  # [B, C_out, T, H, W]


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))). `stack` indices match genmo's nn.Sequential
    (0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 conv), hence the keys `stack.{0,2,3,5}`."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.stack = nn.ModuleList(
            [
                FrameGroupNorm(channels, groups),
                nn.SiLU(),
                CausalConv3d(channels, channels),
                FrameGroupNorm(channels, groups),
                nn.SiLU(),
                CausalConv3d(channels, channels),
            ]
        )

    def forward(self, x: torch.Tensor, context: CausalContext) -> torch.Tensor:
        norm1, _, conv1, norm2, _, conv2 = self.stack
        h = F.silu(norm1(x), inplace=True)  # the norm's output is fresh: SiLU in place
        h = conv1(h, context)
        h = F.silu(norm2(h), inplace=True)
        h = conv2(h, context)
        return h.add_(x)


def pointwise(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear over the channel dim of [B, C, T, H, W] (genmo `Conv1x1`)."""
    return linear(x.movedim(1, -1)).movedim(-1, 1)


def depth_to_space_time(x: torch.Tensor, temporal: int, spatial: int, drop_leading: bool) -> torch.Tensor:
    """[B, C*st*s*s, T, H, W] -> [B, C, T*st, H*s, W*s] (channels ordered (C, st, sh, sw) as in
    genmo's einops pattern); at the start of the video the first st - 1 frames are dropped."""
    B, C_in, T, H, W = x.shape
    C = C_in // (temporal * spatial * spatial)
    x = x.reshape(B, C, temporal, spatial, spatial, T, H, W)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, C, T * temporal, H * spatial, W * spatial)
    if drop_leading and temporal > 1:
        x = x[:, :, temporal - 1 :]  # [B, C, T*st - (st - 1), H*s, W*s]
    return x


class FirstBlock(nn.ModuleList):
    """`blocks.0`: [0] the 1x1x1 input conv (latent -> top width), [1:] ResBlocks (genmo's
    nn.Sequential, hence a ModuleList: its keys are `blocks.0.{i}.*`)."""

    def __init__(self, latent_channels: int, width: int, num_res_blocks: int, groups: int):
        super().__init__(
            [nn.Conv3d(latent_channels, width, kernel_size=1)]
            + [ResBlock(width, groups) for _ in range(num_res_blocks)]
        )

    def forward(self, latent: torch.Tensor, context: CausalContext) -> torch.Tensor:
        conv_in, *res_blocks = self
        x = F.conv3d(latent, conv_in.weight.to(latent.dtype), conv_in.bias.to(latent.dtype))  # [B, C, T, H, W]
        for block in res_blocks:
            x = block(x, context)
        return x


class UpsampleBlock(nn.Module):
    """`blocks.1..n`: ResBlocks at the input width, a pointwise `proj` to out_width * e * 2 * 2,
    then depth-to-space-time (genmo `CausalUpsampleBlock`)."""

    def __init__(self, in_width: int, out_width: int, num_res_blocks: int, temporal_expansion: int, groups: int):
        super().__init__()
        self.temporal_expansion = temporal_expansion
        self.blocks = nn.ModuleList([ResBlock(in_width, groups) for _ in range(num_res_blocks)])
        self.proj = Linear(in_width, out_width * temporal_expansion * SPATIAL_EXPANSION**2)

    def forward(self, x: torch.Tensor, context: CausalContext) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, context)
        x = pointwise(self.proj, x)  # [B, C_out*e*4, T, H, W]
        # [B, C_out, e*T - (e-1), 2H, 2W] in the first chunk, [B, C_out, e*T, 2H, 2W] after it
        return depth_to_space_time(x, self.temporal_expansion, SPATIAL_EXPANSION, context.first_chunk)


class LastBlock(nn.ModuleList):
    """`blocks.{n+1}`: ResBlocks at the finest width (keys `blocks.{n+1}.{i}.*`)."""

    def __init__(self, width: int, num_res_blocks: int, groups: int):
        super().__init__([ResBlock(width, groups) for _ in range(num_res_blocks)])

    def forward(self, x: torch.Tensor, context: CausalContext) -> torch.Tensor:
        for block in self:
            x = block(x, context)
        return x


class MochiVAEDecoder(nn.Module):
    """Mochi-1 VAE decoder (genmo `Decoder`), any size.

    Args:
        config: VAEDecoderConfig (use `VAEDecoderConfig.from_shapes` for a checkpoint).
    """

    def __init__(self, config: VAEDecoderConfig):
        super().__init__()
        self.config = config
        ch, res, groups = config.channels, config.num_res_blocks, config.norm_groups
        n = config.num_up_blocks
        blocks: list[nn.Module] = [FirstBlock(config.latent_channels, ch[-1], res[-1], groups)]
        for i in range(n):  # coarse -> fine, as genmo builds them
            expansion = config.temporal_expansions[-i - 1]
            blocks.append(UpsampleBlock(ch[-i - 1], ch[-i - 2], res[-i - 2], expansion, groups))
        blocks.append(LastBlock(ch[0], res[0], groups))
        self.blocks = nn.ModuleList(blocks)
        self.output_proj = Linear(ch[0], config.out_channels)

    @torch.no_grad()
    def decode_chunk(
        self, latent: torch.Tensor, carried: list[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode consecutive latent frames, continuing from the previous chunk (inference only:
        runs without autograd).

        Args:
            latent: [B, 12, t, h, w] VAE-space latent frames; its dtype is the compute dtype.
            carried: the list the previous chunk returned (consumed: its entries are released as
                they are used), or None for the chunk that starts the video.

        Returns:
            frames: [B, 3, 6t - 5, 8h, 8w] for the first chunk, [B, 3, 6t, 8h, 8w] after it, so the
                chunks of a video concatenate to exactly 6T - 5 frames equal to one full decode.
            carried: the frames every causal conv needs for the next chunk (2 per conv).
        """
        context = CausalContext(carried)
        first, *up_blocks, last = self.blocks
        x = first(latent, context)  # [B, C_top, t, h, w]
        for block in up_blocks:
            x = block(x, context)  # time x e (minus e-1 at the start), space x 2
        x = last(x, context)  # [B, C_0, F, 8h, 8w]
        x = F.silu(x, inplace=True)  # genmo's output nonlinearity; x is the last residual sum (fresh)
        frames = pointwise(self.output_proj, x)  # [B, 3, F, 8h, 8w]
        return frames, context.saved

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a VAE-space latent video in one untiled pass (bounded-memory tiled decoding is
        `vae_tiling.decode_tiled`, which calls `decode_chunk`).

        Args:
            latent: [B, 12, T, H, W] VAE-space latent (model space x std + mean); its dtype is the
                compute dtype (weights are cast to it; norms run in fp32).

        Returns:
            [B, 3, 6T - 5, 8H, 8W] video, nominally in [-1, 1] (not clamped), in the latent's dtype.
        """
        self.check_latent(latent)
        frames, _ = self.decode_chunk(latent, None)
        return frames

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise ValueError unless latent is [B, latent_channels, T >= 1, H >= 1, W >= 1]."""
        channels = self.config.latent_channels
        if latent.dim() != 5 or latent.shape[1] != channels or min(latent.shape) < 1:
            raise ValueError(
                f"the VAE decoder takes a latent video [B, {channels}, T, H, W] with T, H, W >= 1; "
                f"got shape {tuple(latent.shape)}"
            )
