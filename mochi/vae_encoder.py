"""Mochi-1's VAE encoder (genmo `Encoder` semantics): video [-1, 1] -> VAE-space latent mean.

Module attributes carry genmo's key names (`layers.0`, `layers.N.stack.K`,
`layers.N.layers.0` for a strided conv, `layers.N.layers.M.attn_block.attn.qkv`, `output_norm`,
`output_proj`), so genmo's `encoder.safetensors` and the `encoder.`-stripped half of ComfyUI's
`mochi_vae.safetensors` load without renaming. `VAEEncoderConfig.from_shapes` reads every width,
depth, reduction and attention flag from the tensor shapes.

Structure (real sizes; widths ``channels = 64 * [1, 2, 4, 6]`` from finest to coarsest):

    fourier      3 RGB channels + sin / cos at 2^6 and 2^7 cycles per unit -> 15 channels
    layers.0     Linear 15 -> 64 over channels
    layers.1-3   3 ResBlocks at 64 (no attention)
    layers.4     strided conv 64 -> 128 (kernel = stride = 1x2x2), 3 ResBlocks + attention
    layers.5     strided conv 128 -> 256 (2x2x2), 4 ResBlocks + attention
    layers.6     strided conv 256 -> 384 (3x2x2), 6 ResBlocks + attention
    layers.7-9   3 ResBlocks + attention at 384
    output_norm, SiLU, output_proj (Linear 384 -> 24, no bias): mean (first 12) and log-variance

ResBlocks are the decoder's (`vae.ResBlock`: GroupNorm per frame, causal 3x3x3 convs with
replicated edges). Where the encoder has attention, a ResBlock is followed by
``x + attn(norm(x))``: self-attention along time at every pixel separately (32-wide heads,
L2-normalised queries and keys, causal), genmo's `AttentionBlock`. A strided conv pads
`kernel - 1` replicated frames in front (causal), none in space. F = 6k + 1 frames become
k + 1 latent frames (1 -> 1 -> 3k + 1 -> k + 1).

Causal attention follows genmo (`is_causal=True`) and diffusers' `AutoencoderKLMochi`; ComfyUI's
port (`comfy/ldm/genmo/vae/model.py`) calls its attention without a mask, so its encoder lets
early frames see later ones and its latents differ from genmo's (tools/comfy_encoder_check.py:
with that call made causal ComfyUI's VAEEncode equals ours to 4e-6 on random full-size weights;
as shipped it differs by O(1) there; with the real weights not measured). The checkpoint was
trained with genmo's code, so we follow genmo.

`encode` returns the distribution's mean (no sampling), in VAE space, as ComfyUI's
`VideoVAE.encode` (`.mode()`) does; core `VAEEncode` hands that to the LATENT unnormalised (the
DiT side applies the latent mean / std), so our LATENT is in the same space.

Neither time nor space splits exactly: attention joins all frames of a pixel, GroupNorm all
pixels of a frame. `vae_encoder_tiling` tiles space only and states the error.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Linear
from .vae import NORM_GROUPS, CausalContext, FrameGroupNorm, ResBlock, causal_replicate_pad, default_norm_groups, pointwise

FOURIER_OCTAVES = (6, 7)  # genmo FourierFeatures(start=6, stop=8): frequencies 2^6 and 2^7 (x 2 pi)
HEAD_DIM = 32  # genmo Attention(head_dim=32)
ATTENTION_CHUNK = 2**15  # pixels per attention call (genmo: larger batches fail on CUDA)


def fourier_channels(in_channels: int) -> int:
    """Channels after the Fourier features: the input plus a sin and a cos per octave."""
    return in_channels * (1 + 2 * len(FOURIER_OCTAVES))


@dataclass(frozen=True)
class VAEEncoderConfig:
    """Size of a Mochi VAE encoder. Defaults are the real encoder.

    Lists run from the finest (input) level to the coarsest (latent) level, as in genmo's
    constructor.

    Args:
        channels: widths per level; real (64, 128, 256, 384).
        num_res_blocks: ResBlocks per group, one more entry than `channels`: entry 0 the blocks
            after the input Linear, entry i in 1..n-1 the downsampling block into width
            channels[i], the last entry the blocks at the end. Real (3, 3, 4, 6, 3).
        temporal_reductions: time stride of each downsampling block; real (1, 2, 3).
        has_attention: per ResBlock group (same indexing as `num_res_blocks`); real
            (False, True, True, True, True). Widths with attention must be multiples of 32.
        in_channels: 3 (RGB; the Fourier features make 15 of them).
        latent_channels: 12 (the output projection makes 24: mean and log-variance).
        norm_groups: GroupNorm groups; must divide every width (see `vae.default_norm_groups`).
    """

    channels: tuple[int, ...] = (64, 128, 256, 384)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_reductions: tuple[int, ...] = (1, 2, 3)
    has_attention: tuple[bool, ...] = (False, True, True, True, True)
    in_channels: int = 3
    latent_channels: int = 12
    norm_groups: int = NORM_GROUPS

    def __post_init__(self):
        levels = len(self.channels)
        if levels < 2:
            raise ValueError(f"a Mochi VAE encoder needs at least 2 channel levels, got {self.channels}")
        for name in ("num_res_blocks", "has_attention"):
            if len(getattr(self, name)) != levels + 1:
                raise ValueError(
                    f"{name}={getattr(self, name)} needs {levels + 1} entries for {levels} channel levels {self.channels}"
                )
        if len(self.temporal_reductions) != levels - 1 or any(r < 1 for r in self.temporal_reductions):
            raise ValueError(
                f"temporal_reductions={self.temporal_reductions} needs {levels - 1} entries >= 1 for channel "
                f"levels {self.channels}"
            )
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} does not divide the widths {bad}; use "
                f"default_norm_groups({self.channels}) = {default_norm_groups(self.channels)}"
            )
        bad = [self.group_width(i) for i, a in enumerate(self.has_attention) if a and self.group_width(i) % HEAD_DIM]
        if bad:
            raise ValueError(f"attention needs widths that are multiples of {HEAD_DIM} (its head size); got {bad}")

    def group_width(self, group: int) -> int:
        """Width of ResBlock group `group` (0: after the input Linear; last: the final blocks)."""
        return self.channels[min(group, len(self.channels) - 1)]

    @property
    def spatial_compression(self) -> int:
        """Video pixels per latent pixel along height and width (8 for the real encoder)."""
        return 2 ** (len(self.channels) - 1)

    @property
    def temporal_compression(self) -> int:
        """Product of the temporal reductions (6 for the real encoder)."""
        return math.prod(self.temporal_reductions)

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames of a video: each causal stride r maps f frames to (f + r - 1) // r, so
        6k + 1 -> k + 1 for the real encoder."""
        for r in self.temporal_reductions:
            video_frames = (video_frames + r - 1) // r
        return video_frames

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "VAEEncoderConfig":
        """Infer the size from tensor shapes keyed by genmo names (no `encoder.` prefix).

        Raises KeyError for a missing sizing key (the checkpoint loader turns it into a message).
        """
        first_width, in_features = shapes["layers.0.weight"]
        in_channels, rem = divmod(in_features, fourier_channels(1))
        if rem:
            raise ValueError(f"layers.0 takes {in_features} channels, not (1 + 2 x 2) x the RGB channels")
        index = 1

        def res_group(prefix: str) -> tuple[int, bool]:
            """(ResBlocks, has attention) of consecutive `{prefix}{i}.stack` blocks from `index`."""
            nonlocal index
            start = index
            while f"{prefix}{index}.stack.0.weight" in shapes:
                index += 1
            return index - start, f"{prefix}{start}.attn_block.attn.qkv.weight" in shapes

        first = res_group("layers.")
        channels, reductions, down = [first_width], [], []
        while f"layers.{index}.layers.0.weight" in shapes:  # a downsampling block
            out_width, in_width, reduction = shapes[f"layers.{index}.layers.0.weight"][:3]
            if in_width != channels[-1]:
                raise ValueError(f"layers.{index} takes {in_width} channels but the previous block makes {channels[-1]}")
            channels.append(out_width)
            reductions.append(reduction)
            block, index = index, 1
            down.append(res_group(f"layers.{block}.layers."))
            index = block + 1
        if not down:
            raise KeyError(f"layers.{index}.layers.0.weight")
        last = res_group("layers.")
        double, last_width = shapes["output_proj.weight"]
        if last_width != channels[-1]:
            raise ValueError(f"output_proj takes {last_width} channels but the last block makes {channels[-1]}")
        groups = [first, *down, last]
        widths = tuple(channels)
        return cls(
            channels=widths,
            num_res_blocks=tuple(count for count, _ in groups),
            temporal_reductions=tuple(reductions),
            has_attention=tuple(attention for _, attention in groups),
            in_channels=in_channels,
            latent_channels=double // 2,
            norm_groups=default_norm_groups(widths),
        )


class WholeVideo(CausalContext):
    """The causal context of a video encoded in one piece: convs replicate their first frame and
    nothing is carried (the encoder's attention spans all frames, so it never runs in chunks)."""

    def __init__(self):
        super().__init__(None)

    def exchange(self, tail: torch.Tensor) -> None:
        """Nothing to keep for a next chunk."""


def add_fourier_features(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, 5C, T, H, W]: the input, then sin and cos of 2 pi 2^k x for k = 6, 7
    (channel order c0k6, c0k7, c1k6, ... within each of sin and cos, as genmo). Computed in fp32
    (x 128 x 2 pi would lose the phase in bf16) and returned in the input's dtype."""
    x = video.float()
    C = x.shape[1]
    octaves = torch.tensor(FOURIER_OCTAVES, dtype=torch.float32, device=x.device)
    w = (torch.pow(2.0, octaves) * (2 * torch.pi)).repeat(C).view(1, -1, 1, 1, 1)  # [1, C*2, 1, 1, 1]
    h = w * x.repeat_interleave(len(FOURIER_OCTAVES), dim=1)  # [B, C*2, T, H, W]
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1).to(video.dtype)  # [B, 5C, T, H, W]


class TemporalAttention(nn.Module):
    """Causal self-attention along time at each pixel (genmo `Attention`: `qkv` without bias,
    `out` with bias, L2-normalised q and k, scale 1/sqrt(32))."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_heads = dim // HEAD_DIM
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        tokens = x.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)  # [N, T, C], N = B*H*W pixels
        out = torch.empty_like(tokens)
        for start in range(0, tokens.shape[0], ATTENTION_CHUNK):
            chunk = tokens[start : start + ATTENTION_CHUNK]
            qkv = self.qkv(chunk).unflatten(2, (3, self.num_heads, HEAD_DIM))  # [n, T, 3, heads, 32]
            q, k, v = qkv.transpose(1, 3).unbind(2)  # each [n, heads, T, 32]
            # L2 norm in fp32, then back to the compute dtype (genmo normalises in the input dtype)
            q = F.normalize(q.float(), dim=-1).to(v.dtype)
            k = F.normalize(k.float(), dim=-1).to(v.dtype)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HEAD_DIM**-0.5)  # [n, heads, T, 32]
            out[start : start + ATTENTION_CHUNK] = self.out(attended.transpose(1, 2).flatten(2))  # [n, T, C]
        return out.reshape(B, H, W, T, C).permute(0, 4, 3, 1, 2)  # [B, C, T, H, W]


class AttentionBlock(nn.Module):
    """x + attn(norm(x)) (genmo `AttentionBlock`; keys `attn_block.norm.*`, `attn_block.attn.*`)."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norm = FrameGroupNorm(dim, groups)
        self.attn = TemporalAttention(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class EncoderResBlock(ResBlock):
    """The decoder's ResBlock, optionally followed by an AttentionBlock (genmo `ResBlock` with
    `attn_block`; no `attn_block` keys where the encoder has none)."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__(channels, groups)
        self.attn_block = AttentionBlock(channels, groups) if attention else None

    def forward(self, x: torch.Tensor, context: CausalContext) -> torch.Tensor:
        x = super().forward(x, context)
        return x if self.attn_block is None else self.attn_block(x)


class StridedCausalConv(nn.Module):
    """Downsampling conv with kernel = stride = (r, 2, 2): r - 1 replicated frames in front, no
    spatial padding (genmo `PConv3d` in `DownsampleBlock`; keys `weight`, `bias`)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: int, spatial: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, temporal, spatial, spatial))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temporal, spatial = self.weight.shape[2], self.weight.shape[3]
        padded = causal_replicate_pad(x, None, temporal - 1, 0)  # [B, C, r - 1 + T, H, W]
        stride = (temporal, spatial, spatial)
        # [B, C_out, (T + r - 1) // r, H / 2, W / 2]
        return F.conv3d(padded, self.weight.to(x.dtype), self.bias.to(x.dtype), stride=stride)


class DownsampleBlock(nn.Module):
    """`layers.N`: `layers.0` a strided conv, `layers.1..` ResBlocks (genmo `DownsampleBlock`)."""

    def __init__(self, in_width: int, out_width: int, num_res_blocks: int, temporal: int, groups: int, attention: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            [StridedCausalConv(in_width, out_width, temporal)]
            + [EncoderResBlock(out_width, groups, attention) for _ in range(num_res_blocks)]
        )

    def forward(self, x: torch.Tensor, context: CausalContext) -> torch.Tensor:
        conv, *res_blocks = self.layers
        x = conv(x)
        for block in res_blocks:
            x = block(x, context)
        return x


class MochiVAEEncoder(nn.Module):
    """Mochi-1 VAE encoder (genmo `Encoder`), any size.

    Args:
        config: VAEEncoderConfig (use `VAEEncoderConfig.from_shapes` for a checkpoint).
    """

    def __init__(self, config: VAEEncoderConfig):
        super().__init__()
        self.config = config
        ch, res, attn, groups = config.channels, config.num_res_blocks, config.has_attention, config.norm_groups
        layers: list[nn.Module] = [Linear(fourier_channels(config.in_channels), ch[0])]
        layers += [EncoderResBlock(ch[0], groups, attn[0]) for _ in range(res[0])]
        for i, reduction in enumerate(config.temporal_reductions):
            layers.append(DownsampleBlock(ch[i], ch[i + 1], res[i + 1], reduction, groups, attn[i + 1]))
        layers += [EncoderResBlock(ch[-1], groups, attn[-1]) for _ in range(res[-1])]
        self.layers = nn.ModuleList(layers)
        self.output_norm = FrameGroupNorm(ch[-1], groups)
        self.output_proj = Linear(ch[-1], 2 * config.latent_channels, bias=False)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode a video to the mean of its latent distribution (inference only).

        Args:
            video: [B, 3, F, H, W] in [-1, 1], F = 6k + 1, H and W multiples of 8; its dtype is
                the compute dtype (weights are cast to it; norms run in fp32).

        Returns:
            [B, 12, k + 1, H / 8, W / 8] VAE-space latent (the mean; no sampling), in the
            video's dtype.
        """
        self.check_video(video)
        context = WholeVideo()
        proj_in, *blocks = self.layers
        x = pointwise(proj_in, add_fourier_features(video))  # [B, C_0, F, H, W]
        for block in blocks:
            x = block(x, context)  # strided convs: time / r, space / 2
        x = F.silu(self.output_norm(x), inplace=True)  # [B, C_n, t, h, w]
        moments = pointwise(self.output_proj, x)  # [B, 24, t, h, w]
        return moments[:, : self.config.latent_channels]  # [B, 12, t, h, w] the mean

    def check_video(self, video: torch.Tensor) -> None:
        """`check_video(video, self.config)`."""
        check_video(video, self.config)


def check_video(video: torch.Tensor, config: VAEEncoderConfig) -> None:
    """Raise ValueError unless video is [B, in_channels, F, H, W] with F = 6k + 1 and H, W
    multiples of 8 (the rule the encoder's strides need), naming the nearest valid sizes."""
    channels, step, space = config.in_channels, config.temporal_compression, config.spatial_compression
    if video.dim() != 5 or video.shape[1] != channels or min(video.shape) < 1:
        raise ValueError(
            f"the VAE encoder takes a video [B, {channels}, F, H, W] with F, H, W >= 1; got shape {tuple(video.shape)}"
        )
    frames, H, W = video.shape[2:]
    if (frames - 1) % step:
        raise ValueError(
            f"the VAE encoder needs {step}k + 1 frames; got {frames}; use {nearest_frame_counts(frames, step)}"
        )
    for name, size in (("height", H), ("width", W)):
        if size % space:
            raise ValueError(f"the VAE encoder needs a {name} that is a multiple of {space}; got {size}; "
                             f"use {nearest_multiples(size, space)}")


def nearest_frame_counts(frames: int, step: int) -> str:
    """'7 or 13 frames' for frames=10, step=6: the valid counts step*k + 1 around `frames`."""
    below = max(1, ((frames - 1) // step) * step + 1)
    above = below + step
    return f"{below} frames" if below == frames else f"{below} or {above} frames"


def nearest_multiples(size: int, step: int) -> str:
    """'480 or 496' for size=490, step=16 (just the one above when below would be 0)."""
    below, above = (size // step) * step, (size // step + 1) * step
    return str(above) if below == 0 else f"{below} or {above}"


def images_to_video(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE frames [F, H, W, 3] in [0, 1] -> encoder input [1, 3, F, H, W] in [-1, 1]
    (core `VAEEncode` via `VAE.encode`: x * 2 - 1, frames as time)."""
    return (images.movedim(-1, 0).unsqueeze(0) * 2.0 - 1.0).contiguous()  # [1, 3, F, H, W]
