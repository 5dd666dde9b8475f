"""Mochi-1's asymmetric joint diffusion transformer (genmo `AsymmDiTJoint` semantics).

Module attributes carry genmo's checkpoint key names (`blocks.N.attn.qkv_x`, ...), so genmo and
ComfyUI files load without renaming. The size is not fixed: `DiTConfig.from_shapes` reads depth,
widths and heads from a checkpoint's tensor shapes, so a tiny test file and the 10B file go
through the same code.

Conventions (genmo): `forward(latent, sigma, ...)` embeds the time as `1 - sigma` and returns the
model's native prediction `x0 - noise` (ComfyUI's wrapper negates it). One sample per call
(B = 1): text tokens are packed to the valid ones, as genmo's varlen attention does, so samples with
different prompt lengths are separate calls.
"""

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .constants import ROPE_TARGET_AREA, TIMESTEP_FREQ_DIM, TIMESTEP_SCALE
from .joint_attention import joined_attention, joint_attention
from .layers import Linear, RMSNorm
from .parallel.kernel import AttentionConfig
from .parallel.kernel_choice import KernelChoice

ATTENTION_POOL_HEADS = 8  # genmo's T5 attention pool; not visible in tensor shapes
NORM_EPS = 1e-6  # modulated / residual RMS norms and the final LayerNorm
QK_NORM_EPS = 1e-5


class DiTCompile(str, Enum):
    """Whether the DiT's blocks run through `torch.compile` (the loader's `compile`, the CLI's
    `--compile`). ON compiles, per block, the two regions between collectives: before attention
    (modulation, modulated RMSNorms, q/k/v projections, q/k norms, RoPE) and after it and its
    output projections (gates, SwiGLU MLPs, residuals). Attention and every collective stay eager. The
    regions are compiled with dynamic token counts, so another size or prompt length does not
    recompile; counts 0 and 1 get graphs of their own (`MochiDiT.compile_now` builds the empty
    prompt's with the rest, before the first forward)."""

    OFF = "off"
    ON = "on"

    @classmethod
    def parse(cls, value: "DiTCompile | str") -> "DiTCompile":
        """The member for a member or its value; a ValueError listing the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"compile={value!r}; use one of {', '.join(c.value for c in cls)}") from None


def _region(function, compile: DiTCompile):
    """`function` itself, or compiled (see `DiTCompile`; `_token_dims_dynamic` marks its inputs)."""
    return torch.compile(function) if compile is DiTCompile.ON else function


def _token_dims_dynamic(*tensors_and_dims) -> None:
    """Mark the token-count dims of a compiled region's inputs dynamic, so the first compile is
    already general in them (and only in them: widths, heads and head_dim stay static, which
    keeps the kernels specialised). Takes (tensor or None, dim) pairs."""
    for tensor, dim in tensors_and_dims:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


@dataclass(frozen=True)
class DiTConfig:
    """Size of a Mochi DiT. The full model: depth 48, 24 heads x 128, widths 3072 / 1536.

    Args:
        depth: number of joint blocks; the last one does not update the text stream.
        num_heads: attention heads (both streams).
        head_dim: channels per head.
        hidden_size_x: visual stream width.
        hidden_size_y: text stream width.
        mlp_hidden_x: SwiGLU hidden width of the visual MLP (8192 for the full model).
        mlp_hidden_y: SwiGLU hidden width of the text MLP (4096).
        in_channels: latent channels (12).
        patch_size: square patch on the latent grid (2).
        t5_feat_dim: T5 feature width (4096).
        timestep_freq_dim: sinusoidal timestep embedding width (256).
    """

    depth: int = 48
    num_heads: int = 24
    head_dim: int = 128
    hidden_size_x: int = 3072
    hidden_size_y: int = 1536
    mlp_hidden_x: int = 8192
    mlp_hidden_y: int = 4096
    in_channels: int = 12
    patch_size: int = 2
    t5_feat_dim: int = 4096
    timestep_freq_dim: int = TIMESTEP_FREQ_DIM

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"a Mochi DiT needs at least one block, got depth={self.depth}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.t5_feat_dim % ATTENTION_POOL_HEADS:
            raise ValueError(
                f"t5_feat_dim={self.t5_feat_dim} must be divisible by the {ATTENTION_POOL_HEADS} "
                "attention-pool heads"
            )

    @property
    def inner_dim(self) -> int:
        """Attention width: heads x head_dim (3072 for the full model)."""
        return self.num_heads * self.head_dim

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "DiTConfig":
        """Infer the size from tensor shapes keyed by genmo names (no prefix).

        Raises KeyError for a missing key; the checkpoint loader turns that into a message about
        what the file looks like.
        """
        depth = 0
        while f"blocks.{depth}.mod_x.weight" in shapes:
            depth += 1
        _, num_heads, half_head_dim = shapes["pos_frequencies"]
        hidden_size_x, in_channels, patch_size, _ = shapes["x_embedder.proj.weight"]
        hidden_size_y, t5_feat_dim = shapes["t5_yproj.weight"]
        mlp_hidden_x = shapes["blocks.0.mlp_x.w1.weight"][0] // 2
        # The last block has no text MLP, so a one-block model has none at all (the width is unused).
        mlp_y_key = "blocks.0.mlp_y.w1.weight"
        mlp_hidden_y = shapes[mlp_y_key][0] // 2 if mlp_y_key in shapes else 4 * hidden_size_y
        return cls(
            depth=depth,
            num_heads=num_heads,
            head_dim=2 * half_head_dim,
            hidden_size_x=hidden_size_x,
            hidden_size_y=hidden_size_y,
            mlp_hidden_x=mlp_hidden_x,
            mlp_hidden_y=mlp_hidden_y,
            in_channels=in_channels,
            patch_size=patch_size,
            t5_feat_dim=t5_feat_dim,
            timestep_freq_dim=shapes["t_embedder.mlp.0.weight"][1],
        )


def modulated_rmsnorm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """rmsnorm(x) * (1 + scale). x [B, S, D], scale [B, D].

    The fused norm accumulates in fp32 whatever x's dtype, so x is not copied to fp32 first; its
    output (in x's dtype) is scaled in place: one [B, S, D] allocation."""
    normed = F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)  # fresh [B, S, D], fp32 inside
    return normed.mul_((1.0 + scale.float())[:, None].to(x.dtype))


def residual_tanh_gated_rmsnorm(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + rmsnorm(residual) * tanh(gate). x, residual [B, S, D], gate [B, D]. One [B, S, D]
    allocation (normalise with fp32 accumulation, gate in place, add)."""
    normed = F.rms_norm(residual, (residual.shape[-1],), eps=NORM_EPS)  # fresh [B, S, D], fp32 inside
    normed.mul_(torch.tanh(gate.float())[:, None].to(residual.dtype))
    return normed.add_(x) if normed.dtype == x.dtype else x + normed.to(x.dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (even, odd) channel pairs by the table's angles, in fp32 real arithmetic:
    even' = even cos - odd sin, odd' = even sin + odd cos (no complex tensors: Inductor handles
    them poorly).

    Eager, one fp32 copy of x is rotated in place (one half-size temporary); compiled, the same
    arithmetic is written without in-place updates of views (those pin the token count in the
    graph) and Inductor fuses it into one pass.

    Args:
        x: [B, S, H, Dh] (contiguous pairs).
        rope: [S, H, Dh/2, 2] (cos, sin) in fp32 or the compute dtype (`MochiDiT.rope_table`).

    Returns:
        [B, S, H, Dh] in x's dtype (a new tensor).
    """
    cos, sin = rope.unbind(-1)  # [S, H, Dh/2] each
    if torch.compiler.is_compiling():
        even, odd = x.unflatten(-1, (-1, 2)).float().unbind(-1)  # [B, S, H, Dh/2] fp32 each
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # [B, S, H, Dh/2, 2]
        return rotated.flatten(-2).to(x.dtype)
    pairs = x.to(torch.float32, copy=True)  # [B, S, H, Dh] fp32, rotated in place below
    even, odd = pairs.unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, Dh/2] views
    even_sin = even * sin
    even.mul_(cos).addcmul_(odd, sin, value=-1.0)
    odd.mul_(cos).add_(even_sin)
    return pairs.to(x.dtype)


def rope_positions(T: int, pH: int, pW: int, device=None) -> torch.Tensor:
    """(t, h, w) per token in (t, h, w) order: h, w are bin centres centred on 0 and scaled so the
    patch grid has area 36864. Returns [T*pH*pW, 3] fp32."""
    scale = math.sqrt(ROPE_TARGET_AREA / (pH * pW))

    def centres(n: int) -> torch.Tensor:
        edges = torch.linspace(-n * scale / 2, n * scale / 2, n + 1, device=device, dtype=torch.float32)
        return (edges[:-1] + edges[1:]) / 2

    t = torch.arange(T, device=device, dtype=torch.float32)
    grid = torch.meshgrid(t, centres(pH), centres(pW), indexing="ij")
    return torch.stack(grid, dim=-1).view(-1, 3)  # [S, 3]


class PatchEmbed(nn.Module):
    """Per-frame 2x2 patch embedding (a strided Conv2d), tokens in (t, h, w) order."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size_x, kernel_size=p, stride=p, bias=True)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = latent.shape
        # frames in channels-last layout, so the conv writes its output already in token order
        # (t, h, w, channel): the [B, S, D] result is a view of it, not a second full-size copy
        frames = rearrange(latent, "b c t h w -> (b t) h w c").contiguous().permute(0, 3, 1, 2)  # [B*T, C, H, W]
        # weights cast to the compute dtype (the latent's), like `Linear`: [B*T, D, H/p, W/p]
        weight, bias = self.proj.weight.to(latent.dtype), self.proj.bias.to(latent.dtype)
        patches = F.conv2d(frames, weight, bias, stride=self.proj.stride)
        tokens = patches.permute(0, 2, 3, 1)  # [B*T, H/p, W/p, D]
        return tokens.reshape(B, -1, tokens.shape[-1])  # [B, S, D], S = T * H/p * W/p (a view when contiguous)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t * 1000 (cos first, max period 10000) -> Linear, SiLU, Linear."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.freq_dim = config.timestep_freq_dim
        self.mlp = nn.Sequential(
            Linear(config.timestep_freq_dim, config.hidden_size_x),
            nn.SiLU(),
            Linear(config.hidden_size_x, config.hidden_size_x),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * TIMESTEP_SCALE)[:, None] * freqs[None]  # [B, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, freq_dim]
        return self.mlp(embedding.to(dtype))  # [B, Dx]


class AttentionPool(nn.Module):
    """Pools the valid T5 tokens into one vector: the masked mean is the query of one attention
    over [mean, tokens] (8 heads). With no valid token the mean is zero and attends to itself.

    With a single query the key and value projections fold into the query side (`to_kv` is linear):
    score_j = (Wk t_j + bk) . q = t_j . (Wk^T q) + bk . q, and sum_j p_j (Wv t_j + bv) =
    Wv (sum_j p_j t_j) + bv since the p_j sum to 1. So the [L, 4096] x [4096, 8192] projection of
    every token is never formed; the cost drops from L x 4096 x 8192 to about (L + 1024) x 4096 x 8.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.t5_feat_dim
        self.to_kv = Linear(dim, 2 * dim)
        self.to_q = Linear(dim, dim)
        self.to_out = Linear(dim, config.hidden_size_x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, L, D = tokens.shape  # valid tokens only
        heads = ATTENTION_POOL_HEADS
        head_dim = D // heads
        mean = tokens.sum(dim=1, keepdim=True) / max(L, 1)  # [B, 1, D]
        sequence = torch.cat([mean, tokens], dim=1)  # [B, 1+L, D]
        q = self.to_q(mean).view(B, heads, head_dim)  # [B, h, D/h]
        w_k, w_v = self.to_kv.weight_as(tokens.dtype).view(2, heads, head_dim, D).unbind(0)  # [h, D/h, D]
        b_k, b_v = self.to_kv.bias.to(tokens.dtype).view(2, heads, head_dim).unbind(0)  # [h, D/h]
        q_folded = torch.einsum("bhe,hed->bhd", q, w_k)  # [B, h, D] = Wk^T q per head
        # scores, softmax and the weighted token sum in fp32 (a few MB), as an attention kernel would
        sequence32 = sequence.float()
        bias_score = (q.float() * b_k.float()).sum(-1, keepdim=True)  # [B, h, 1]
        scores = torch.einsum("bsd,bhd->bhs", sequence32, q_folded.float()) + bias_score  # [B, h, 1+L]
        probs = torch.softmax(scores / math.sqrt(head_dim), dim=-1)
        mixed = torch.einsum("bhs,bsd->bhd", probs, sequence32).to(tokens.dtype)  # [B, h, D] = sum_j p_j t_j
        pooled = torch.einsum("bhd,hed->bhe", mixed, w_v) + b_v  # [B, h, D/h]
        return self.to_out(pooled.flatten(1))  # [B, Dx]


class FeedForward(nn.Module):
    """SwiGLU: w1 gives [x, gate]; out = w2(silu(x) * gate). No biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, 2 * hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.w1(x).chunk(2, dim=-1)  # [B, S, hidden] each
        return self.w2(F.silu(x).mul_(gate))  # gate in place: one [B, S, hidden] temporary


class JointAttention(nn.Module):
    """The projections around attention over [video tokens, valid text tokens], separate per
    stream. RoPE applies to video q, k only. `update_y=False` (last block) has no text output
    projection. `JointBlock` runs `project`, the (eager) joint attention, then `project_out`."""

    def __init__(self, config: DiTConfig, update_y: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        inner = config.inner_dim
        self.qkv_x = Linear(config.hidden_size_x, 3 * inner, bias=False)
        self.qkv_y = Linear(config.hidden_size_y, 3 * inner, bias=False)
        self.q_norm_x = RMSNorm(config.head_dim, QK_NORM_EPS)
        self.k_norm_x = RMSNorm(config.head_dim, QK_NORM_EPS)
        self.q_norm_y = RMSNorm(config.head_dim, QK_NORM_EPS)
        self.k_norm_y = RMSNorm(config.head_dim, QK_NORM_EPS)
        self.proj_x = Linear(inner, config.hidden_size_x)
        self.proj_y = Linear(inner, config.hidden_size_y) if update_y else None

    def project(self, x: torch.Tensor, y: torch.Tensor, rope: torch.Tensor, joined: bool) -> tuple[torch.Tensor, ...]:
        """q, k, v of both streams, q and k normalised (video's also rotated).

        Nothing returned is a view of a fused projection (a `v` view would keep the whole
        [B, S, 3 * inner] buffer alive through attention).

        Args:
            x: [B, Sx, Dx] normalised video tokens (the local shard under a parallel context).
            y: [B, L, Dy] normalised valid text tokens (replicated on every rank).
            rope: [Sx, H, Dh/2, 2] (cos, sin) for these video tokens' global positions.
            joined: one device: return the joint sequence [video, text] the kernel attends over
                (compiled, the norms and RoPE write straight into it); else the streams apart.

        Returns:
            joined: (q [B, Sx(+L), H, Dh] (text queries only when the text is updated), k, v
            [B, Sx+L, H, Dh]); else (q_x, k_x, v_x) [B, Sx, H, Dh] and (q_y, k_y, v_y) [B, L, H, Dh].
        """
        B, Sx, _ = x.shape
        L = y.shape[1]
        H, Dh = self.num_heads, self.head_dim
        q_x, k_x, v_x = self.qkv_x(x).view(B, Sx, 3, H, Dh).unbind(2)  # [B, Sx, H, Dh] each (views)
        q_x = apply_rope(self.q_norm_x(q_x), rope)  # fresh [B, Sx, H, Dh]
        k_x = apply_rope(self.k_norm_x(k_x), rope)
        q_y, k_y, v_y = self.qkv_y(y).view(B, L, 3, H, Dh).unbind(2)  # [B, L, H, Dh] each
        q_y, k_y = self.q_norm_y(q_y), self.k_norm_y(k_y)
        if not joined:
            return q_x, k_x, v_x.contiguous(), q_y, k_y, v_y
        if L == 0:  # no text: the video tensors are the sequence (only v needs its own copy)
            return q_x, k_x, v_x.contiguous()
        q = torch.cat([q_x, q_y], dim=1) if self.proj_y is not None else q_x  # [B, Sx(+L), H, Dh]
        return q, torch.cat([k_x, k_y], dim=1), torch.cat([v_x, v_y], dim=1)  # [B, Sx+L, H, Dh] each

    def project_out(self, out_x: torch.Tensor, out_y: torch.Tensor | None):
        """Attention outputs [B, Sx, H, Dh], [B, L, H, Dh] (None on the last block) ->
        ([B, Sx, Dx], [B, L, Dy] or None)."""
        B, Sx, H, Dh = out_x.shape
        out_x = self.proj_x(out_x.reshape(B, Sx, H * Dh))  # [B, Sx, Dx]
        if self.proj_y is None:
            return out_x, None
        return out_x, self.proj_y(out_y.reshape(B, out_y.shape[1], H * Dh))  # [B, L, Dy]


class JointBlock(nn.Module):
    """One asymmetric joint block: adaLN-style modulation (scale, gate; no shift) from c.

    The forward is three parts: `before_attention`, the joint attention and the output
    projections (eager: under a parallel context the collectives are there), `after_attention`.
    With `compile` ON the two outer parts run compiled (`DiTCompile`).
    """

    def __init__(self, config: DiTConfig, update_y: bool, compile: DiTCompile = DiTCompile.OFF):
        super().__init__()
        self.update_y = update_y
        self.mod_x = Linear(config.hidden_size_x, 4 * config.hidden_size_x)
        # update_y=False: only the attention input scale for the text stream.
        self.mod_y = Linear(config.hidden_size_x, (4 if update_y else 1) * config.hidden_size_y)
        self.attn = JointAttention(config, update_y)
        self.mlp_x = FeedForward(config.hidden_size_x, config.mlp_hidden_x)
        self.mlp_y = FeedForward(config.hidden_size_y, config.mlp_hidden_y) if update_y else None
        self.compiled = compile is DiTCompile.ON
        self._before_attention = _region(self.before_attention, compile)
        self._after_attention = _region(self.after_attention, compile)

    def attention_input_x(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The visual stream's modulated attention input rmsnorm(x) * (1 + scale_msa_x), exactly as
        `forward` computes it (TeaCache's step indicator for Mochi). x [B, Sx, Dx], c [B, Dx] ->
        [B, Sx, Dx]."""
        scale_msa_x = self.mod_x(F.silu(c)).chunk(4, dim=1)[0]  # [B, Dx]
        return modulated_rmsnorm(x, scale_msa_x)

    def before_attention(self, x, c, y, rope, joined: bool):
        """Modulation, modulated RMSNorms and `JointAttention.project`.

        Returns:
            q, k, v as `JointAttention.project` (joined or not), and the modulation
            `after_attention` takes: (gate_msa_x, scale_mlp_x, gate_mlp_x) [B, Dx] each, then
            (gate_msa_y, scale_mlp_y, gate_mlp_y) [B, Dy] each or three None on the last block.
        """
        c = F.silu(c)
        scale_msa_x, gate_msa_x, scale_mlp_x, gate_mlp_x = self.mod_x(c).chunk(4, dim=1)  # [B, Dx] each
        mod_y = self.mod_y(c)
        if self.update_y:
            scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = mod_y.chunk(4, dim=1)  # [B, Dy] each
        else:
            scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = mod_y, None, None, None
        qkv = self.attn.project(modulated_rmsnorm(x, scale_msa_x), modulated_rmsnorm(y, scale_msa_y), rope, joined)
        return qkv, (gate_msa_x, scale_mlp_x, gate_mlp_x, gate_msa_y, scale_mlp_y, gate_mlp_y)

    def after_attention(self, x, y, attn_x, attn_y, modulation):
        """Gated residuals and the MLPs: x [B, Sx, Dx], y [B, L, Dy] and the projected attention
        outputs [B, Sx, Dx], [B, L, Dy] (None on the last block) -> new (x, y)."""
        gate_msa_x, scale_mlp_x, gate_mlp_x, gate_msa_y, scale_mlp_y, gate_mlp_y = modulation
        x = residual_tanh_gated_rmsnorm(x, attn_x, gate_msa_x)
        x = residual_tanh_gated_rmsnorm(x, self.mlp_x(modulated_rmsnorm(x, scale_mlp_x)), gate_mlp_x)
        if self.update_y:
            y = residual_tanh_gated_rmsnorm(y, attn_y, gate_msa_y)
            y = residual_tanh_gated_rmsnorm(y, self.mlp_y(modulated_rmsnorm(y, scale_mlp_y)), gate_mlp_y)
        return x, y

    def forward(self, x, c, y, rope, ctx=None, video_len=None, attention=None):
        """x [B, Sx, Dx], c [B, Dx] (conditioning), y [B, L, Dy], rope [Sx, H, Dh/2, 2] -> (x, y) same
        shapes.

        Args (beyond those): ctx: ParallelContext or None; video_len: global number of real video
        tokens (without padding), needed under ctx; attention: the kernel choice (see `MochiDiT.forward`).
        """
        if self.compiled:
            _token_dims_dynamic((x, 1), (y, 1), (rope, 0))
        qkv, modulation = self._before_attention(x, c, y, rope, ctx is None)
        if ctx is None:  # one device: q, k, v already joined
            out_x, out_y = joined_attention(*qkv, x.shape[1], need_text=self.update_y, kernels=attention)
        else:
            out_x, out_y = joint_attention(*qkv, ctx=ctx, video_len=video_len, need_text=self.update_y,
                                           kernels=attention)
        del qkv  # out: [B, Sx, H, Dh], [B, L, H, Dh] or None
        attn_x, attn_y = self.attn.project_out(out_x, out_y)  # [B, Sx, Dx], [B, L, Dy] or None
        del out_x, out_y  # the kernel's output is freed before the MLPs run
        if self.compiled:
            _token_dims_dynamic((x, 1), (y, 1), (attn_x, 1), (attn_y, 1))
        return self._after_attention(x, y, attn_x, attn_y, modulation)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by (shift, scale) from c, then a Linear to p*p*C."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        p = config.patch_size
        self.mod = Linear(config.hidden_size_x, 2 * config.hidden_size_x)
        self.linear = Linear(config.hidden_size_x, p * p * config.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(F.silu(c)).chunk(2, dim=1)  # [B, Dx] each
        x = F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)  # fp32 accumulation inside, x's dtype out
        x = torch.addcmul(shift[:, None], x, (1.0 + scale.float())[:, None].to(x.dtype))  # [B, S, Dx]
        return self.linear(x)  # [B, S, p*p*C]


@dataclass
class TokenState:
    """One forward's tokens between the embedding and the final layer.

    `MochiDiT.forward` is `embed`, `run_blocks` over every block, then `head`; step caching
    (`step_cache.py`) calls the three parts itself to run the block stack in two pieces or not at
    all. Mutable on purpose: `run_blocks` takes x and y out and puts the results back, so the
    inputs can be freed while the blocks run (a caller that needs the input keeps its own reference).

    Attributes:
        x: [1, S(_local), Dx] visual tokens (this rank's shard under a parallel context, padded).
        y: [1, Lv, Dy] valid text tokens (replicated on every rank).
        c: [1, Dx] conditioning (time + pooled text).
        rope: [S(_local), H, Dh/2, 2] (cos, sin) for this shard's positions (`MochiDiT.rope_table`).
        grid: (T, pH, pW): latent frames and patch rows and columns; S = T * pH * pW.
        attention: the kernel choice every block of this forward uses.
    """

    x: torch.Tensor
    y: torch.Tensor
    c: torch.Tensor
    rope: torch.Tensor
    grid: tuple[int, int, int]
    attention: KernelChoice

    @property
    def video_len(self) -> int:
        """Global number of real video tokens (without the sequence padding)."""
        T, pH, pW = self.grid
        return T * pH * pW


class MochiDiT(nn.Module):
    """Mochi-1 DiT (genmo `AsymmDiTJoint`), any size. Inference only: run it under torch.no_grad()
    (temporaries are updated in place to save memory traffic).

    Args:
        config: DiTConfig (use `DiTConfig.from_shapes` for a checkpoint).
        compile: DiTCompile.ON runs each block's regions between collectives through torch.compile
            (compiled at the first forward; see `DiTCompile`).
    """

    def __init__(self, config: DiTConfig, compile: DiTCompile = DiTCompile.OFF):
        super().__init__()
        self.config = config
        self.compile_option = DiTCompile.parse(compile)
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config)
        self.t5_y_embedder = AttentionPool(config)
        self.t5_yproj = Linear(config.t5_feat_dim, config.hidden_size_y)
        self.pos_frequencies = nn.Parameter(torch.zeros(3, config.num_heads, config.head_dim // 2))
        self.blocks = nn.ModuleList(
            [JointBlock(config, update_y=i < config.depth - 1, compile=self.compile_option)
             for i in range(config.depth)]
        )
        self.final_layer = FinalLayer(config)
        self._rope_memo = None  # (size key, the frequencies it used, the table): see `_shared_rope_table`

    def forward(
        self,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        ctx=None,
        attention: KernelChoice | None = None,
    ) -> torch.Tensor:
        """Predict x0 - noise for a noisy latent.

        Args:
            latent: [1, C, T, H, W] model-space latent; its dtype is the compute dtype.
            sigma: [1] noise level in [0, 1] (1 = pure noise).
            text_features: [1, L, 4096] T5 features (padded or not).
            text_mask: [1, L] 1 for valid tokens; may be all zero (empty negative prompt).
            ctx: ParallelContext (sequence parallel inside this call) or None for one device.
            attention: the attention kernel choice (`parallel.kernel_choice.KernelChoice`: the one
                place the kernel is decided, measured once per pool where the pool's ranks build
                it measuring); None: the version guess for the context's backend (auto on one
                device). Given with a context, its backend must be the context's.

        Returns:
            [1, C, T, H, W] prediction, in the latent's dtype.
        """
        state = self.embed(latent, sigma, text_features, text_mask, ctx=ctx, attention=attention)
        self.run_blocks(state, 0, self.config.depth, ctx=ctx)
        return self.head(state, ctx=ctx)

    def embed(
        self,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        ctx=None,
        rope: torch.Tensor | None = None,
        attention: KernelChoice | None = None,
    ) -> TokenState:
        """Everything before the first block: patch and text embeddings, conditioning, RoPE, and the
        attention kernel choice.

        Args: as `forward`, and
            rope: the RoPE table of an earlier `embed` of a latent of the same size and dtype under
                the same ctx, to share (None: the model's table for this size, see `rope_table`).

        Returns:
            TokenState with x [1, S(_local), Dx] in the latent's dtype (sharded and padded under ctx).
        """
        B, C, T, H, W = latent.shape
        if B != 1:
            raise ValueError(f"MochiDiT runs one sample per call (packed text); got batch {B}")
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height and width ({H}x{W}) must be multiples of the patch size {p}")
        pH, pW = H // p, W // p
        dtype = latent.dtype
        attention = _kernel_choice_for(ctx, attention)

        valid = text_mask[0].bool()
        text = text_features[:, valid].to(dtype)  # [1, Lv, 4096], valid tokens only
        c = self.t_embedder(1.0 - sigma, dtype) + self.t5_y_embedder(text)  # [1, Dx]
        y = self.t5_yproj(text)  # [1, Lv, Dy]

        x = self.x_embedder(latent)  # [1, S, Dx]
        if ctx is not None:
            x = ctx.shard_sequence(x, dim=1)  # [1, S_local, Dx], padded to a multiple of the SP degree
        if rope is None:
            rope = self._shared_rope_table(T, pH, pW, latent.device, ctx, rope_dtype(dtype))
        elif rope.shape[0] != x.shape[1]:
            raise ValueError(f"a shared RoPE table has {rope.shape[0]} rows but this latent has {x.shape[1]} tokens "
                             "on this rank; share tables only between latents of the same size")
        return TokenState(x=x, y=y, c=c, rope=rope, grid=(T, pH, pW), attention=attention)

    def _shared_rope_table(self, T: int, pH: int, pW: int, device, ctx, dtype: torch.dtype) -> torch.Tensor:
        """`rope_table`, built once per latent size and reused by every later forward of that size
        (every step and branch of a run, every block): the last table is kept with what it was built
        from (the size, this rank's shard, the dtype and the frequencies' storage and version)."""
        shard = (0, 1) if ctx is None else (ctx.sp_rank, ctx.sp_degree)
        frequencies = self.pos_frequencies
        key = (T, pH, pW, torch.device(device), dtype, shard, frequencies._version)
        memo = self._rope_memo
        if memo is None or memo[0] != key or memo[1] is not frequencies:
            self._rope_memo = None  # the old table is freed before the new one is built
            self._rope_memo = (key, frequencies, self.rope_table(T, pH, pW, device, ctx, dtype=dtype))
        return self._rope_memo[2]

    def rope_table(self, T: int, pH: int, pW: int, device, ctx=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """RoPE rotations of this rank's tokens as real (cos, sin) pairs: [S(_local), H, Dh/2, 2] in
        `dtype`. The angles are computed in fp32; the table is stored in the compute dtype (bf16 on
        GPUs: 273 MB at 848x480x163 on one rank, where a complex64 table took 547 MB)."""
        positions = rope_positions(T, pH, pW, device)  # [S, 3]
        if ctx is not None:
            # RoPE for this shard only (padded rows get angle 0; padded tokens are dropped in attention)
            positions = ctx.shard_sequence(positions, dim=0)  # [S_local, 3]
        angles = torch.einsum("sd,dhf->shf", positions, self.pos_frequencies.float())  # [S(_local), H, Dh/2] fp32
        rope = angles.new_empty((*angles.shape, 2), dtype=dtype)  # [S(_local), H, Dh/2, 2]
        torch.cos(angles, out=rope[..., 0])
        torch.sin(angles, out=rope[..., 1])
        del angles  # not needed by the blocks (273 MB at 848x480x163)
        return rope

    @torch.no_grad()
    def compile_now(self, device, dtype: torch.dtype, joined: bool) -> None:
        """Build the compiled regions (`DiTCompile.ON`) on tiny inputs now, before any forward; a
        no-op otherwise. Their token dims are dynamic, so every later size reuses the builds. Ranks
        of a pool call it when they load, so that they reach their first exchange together instead
        of after builds of different lengths (a rank still building would keep the others waiting
        at a collective, against its timeout).

        Args:
            device, dtype: where and in which compute dtype the forwards will run.
            joined: True for one device, False under a ParallelContext (the regions differ).
        """
        if self.compile_option is DiTCompile.OFF:
            return
        config, p = self.config, self.config.patch_size
        latent = torch.zeros(1, config.in_channels, 1, p, 3 * p, device=device, dtype=dtype)  # 3 tokens
        for L in (2, 0):  # a prompt, and the empty negative prompt (token counts 0 and 1 get own graphs)
            features = torch.zeros(1, L, config.t5_feat_dim, device=device)
            state = self.embed(latent, torch.ones(1, device=device), features, torch.ones(1, L, device=device))
            x, y = state.x, state.y
            for block in self.blocks:  # the real data flow (y's layout differs after block 0), attention stubbed
                _token_dims_dynamic((x, 1), (y, 1), (state.rope, 0))
                _, modulation = block._before_attention(x, state.c, y, state.rope, joined)
                out_x, out_y = (torch.zeros(1, S, config.num_heads, config.head_dim, device=device, dtype=dtype)
                                for S in (x.shape[1], L))  # what attention would return
                attn_x, attn_y = block.attn.project_out(out_x, out_y if block.update_y else None)
                _token_dims_dynamic((x, 1), (y, 1), (attn_x, 1), (attn_y, 1))
                x, y = block._after_attention(x, y, attn_x, attn_y, modulation)

    def first_block_modulated_input(self, state: TokenState) -> torch.Tensor:
        """Block 0's modulated visual attention input for these tokens, [1, S(_local), Dx]
        (TeaCache's step indicator; see `JointBlock.attention_input_x`)."""
        return self.blocks[0].attention_input_x(state.x, state.c)

    def run_blocks(self, state: TokenState, start: int, stop: int | None, ctx=None) -> TokenState:
        """Run blocks[start:stop] (stop None: through the last block) on the state's tokens,
        updating its x and y (returns the state).

        The state gives up its x and y while the blocks run, so they are freed as soon as the first
        block is done with them (hold your own reference to keep the input)."""
        x, y = state.x, state.y
        state.x = state.y = None
        for block in self.blocks[start:stop]:
            x, y = block(x, state.c, y, state.rope, ctx=ctx, video_len=state.video_len, attention=state.attention)
        state.x, state.y = x, y
        return state

    def head(self, state: TokenState, ctx=None) -> torch.Tensor:
        """The final layer, the sequence gather and unpatchify: the state's x -> [1, C, T, H, W]
        prediction in x's dtype. Takes x out of the state (it is freed after the final layer)."""
        x, state.x = state.x, None
        dtype = x.dtype
        T, pH, pW = state.grid
        p = self.config.patch_size
        x = self.final_layer(x, state.c)  # [1, S(_local), p*p*C]
        if ctx is not None:
            x = ctx.gather_sequence(x, dim=1, length=state.video_len)  # [1, S, p*p*C]
        return rearrange(
            x, "b (t hp wp) (p1 p2 c) -> b c t (hp p1) (wp p2)", t=T, hp=pH, wp=pW, p1=p, p2=p
        ).to(dtype)


def rope_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The RoPE table's dtype: the compute dtype for bf16 / fp16 (the rotation itself runs in fp32),
    fp32 otherwise."""
    return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _kernel_choice_for(ctx, attention: KernelChoice | None) -> KernelChoice:
    """The forward's kernel choice: the given one, or the guess for the context's backend (auto on
    one device)."""
    if attention is not None and not isinstance(attention, KernelChoice):
        raise TypeError(f"attention must be a parallel.kernel_choice.KernelChoice or None, got {type(attention)}")
    if ctx is None:
        return KernelChoice() if attention is None else attention
    if attention is None:
        return KernelChoice(AttentionConfig(ctx.attention_backend))
    if attention.backend is not ctx.attention_backend:
        raise ValueError(
            f"attention backend {attention.backend.value} differs from the ParallelContext's "
            f"({ctx.attention_backend.value}); build the context with the backend you want "
            "(ParallelContext(..., attention=AttentionConfig(backend))) and a KernelChoice for the same one"
        )
    return attention
