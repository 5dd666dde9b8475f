"""Step caching: skip the DiT's blocks on steps whose input barely changed, one decision per step
for every rank of a parallel pool.

Parallelism divides a step's work, step caching skips it; the two multiply. Two kinds:

- TeaCache (ali-vilab/TeaCache, TeaCache4Mochi). Indicator: the relative L1 change of block 0's
  modulated attention input, rmsnorm(x) * (1 + scale_msa), since the previous step,
  sum|now - before| / sum|before|, rescaled by TeaCache's Mochi polynomial and accumulated. While
  the accumulated value stays under the threshold the step reuses the cached residual of the whole
  block stack (visual stream: output of the last block minus input of the first); otherwise it
  computes, caches the new residual and resets the accumulator. The previous input is updated
  every step, computed or not. TeaCache4Mochi folds its residual through the final norm; here the
  final layer always runs on the current conditioning, so only the blocks are cached.
- First-block cache (ParaAttention / WaveSpeed FBCache, model-agnostic). Block 0 always runs; its
  output residual is compared with the one of the last computed step (relative L1, not
  accumulated), and under the threshold the cached residual of the remaining blocks is reused.

Both: the first and the last step always compute, and so does a step where a branch that has no
cached residual yet is needed (a per-step cfg of 1 drops the unconditional branch). The text stream
needs no cache: only the blocks read it.

One decision for the pool. A rank sees only its sequence shard and, under CFG parallelism, one
branch. The indicator is two sums (numerator and denominator, fp64) over every token of every
branch and sample of the step, all-reduced over the sequence group and then the CFG group, so every
rank compares the same number and skips the same steps. With a batch of samples and both CFG
branches in one step this is exactly TeaCache4Mochi's batched mean. A single rank sums the same
terms locally, so one rank and any degree mix decide alike (up to fp64 rounding of the sums, far
below the indicator's own run-to-run noise of ~1e-6 from sharded fp32 matmuls).

The state (one cached residual and one previous indicator per CFG branch per sample, the rank's
shard only, in the compute dtype) lives in a `StepCache` owned by one sampling run
(`sampler.DenoiseLoop` creates it in `begin()`), never in the model or a module global.
"""

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.distributed as dist

from .constants import DEFAULT_CACHE_THRESHOLD
from .parallel.collective import collective

# TeaCache4Mochi's rescaling polynomial of the relative L1 change, highest power first.
TEACACHE_MOCHI_COEFFICIENTS = (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03)
# The polynomial rises from 0 to its first maximum (0.0975) at a relative change of 0.10760, falls
# after it and turns negative past 0.145: a large change would add little or even subtract. Beyond
# this fitted, rising range the step computes.
TEACACHE_RISING_LIMIT = 0.10760


class StepCacheKind(Enum):
    """Which indicator decides whether a step reuses the cached block residual."""

    TEACACHE = "teacache"
    FIRST_BLOCK = "first_block"

    @property
    def default_threshold(self) -> float:
        """The published Mochi setting of both kinds (constants.DEFAULT_CACHE_THRESHOLD)."""
        return DEFAULT_CACHE_THRESHOLD


MAX_THRESHOLD = 1.0  # TeaCache adds at most ~0.1 per step, so 1 already allows runs of ~10 skips


@dataclass(frozen=True)
class StepCacheSpec:
    """Step caching for one sampling run (None in a SampleRequest: off).

    Args:
        kind: StepCacheKind.TEACACHE or StepCacheKind.FIRST_BLOCK.
        threshold: skip while the (accumulated, for TeaCache) relative change stays under this.
            0 never skips; higher skips more steps and drifts further from the uncached result.
            TeaCache's published Mochi settings: constants.DEFAULT_CACHE_THRESHOLD (~1.5x), 0.09 (~2.1x).
    """

    kind: StepCacheKind
    threshold: float

    def __post_init__(self):
        if not isinstance(self.kind, StepCacheKind):
            choices = ", ".join(kind.value for kind in StepCacheKind)
            raise TypeError(
                f"kind={self.kind!r} must be a StepCacheKind ({choices}); convert a user's choice with "
                f"StepCacheKind(choice)"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold={self.threshold!r} must be a number, e.g. {self.kind.default_threshold}")
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= MAX_THRESHOLD):
            raise ValueError(
                f"threshold={self.threshold!r} must be in [0, {MAX_THRESHOLD}]: 0 never skips, "
                f"{self.kind.default_threshold} is the usual {self.kind.value} setting; raise it to skip more steps"
            )
        object.__setattr__(self, "threshold", float(self.threshold))

    @classmethod
    def default(cls, kind: StepCacheKind) -> "StepCacheSpec":
        """The recommended threshold for a kind."""
        return cls(kind, kind.default_threshold)


@dataclass(frozen=True)
class CacheStats:
    """Which steps ran the block stack and which reused the cached residual (the same on every rank).

    Attributes:
        computed: step indices that ran every block (always the first and the last).
        skipped: step indices that reused the cached residual.
        changes: (step, relative change) for every step that was decided by the indicator (not
            forced to compute), for tuning the threshold; not part of equality.
    """

    computed: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    changes: tuple[tuple[int, float], ...] = field(default=(), compare=False)

    @property
    def steps(self) -> int:
        return len(self.computed) + len(self.skipped)

    def __str__(self) -> str:
        skipped = f" ({', '.join(map(str, self.skipped))})" if self.skipped else ""
        return f"computed {len(self.computed)} of {self.steps} steps, skipped {len(self.skipped)}{skipped}"


@dataclass(frozen=True)
class Evaluation:
    """One DiT call of a step: one sample, one CFG branch.

    Attributes:
        key: (sample index, branch name), the same on every rank.
        latent: [1, 12, T, H, W] in the compute dtype.
        sigma: [1] fp32 noise level.
        text_features: [1, L, 4096]; text_mask: [1, L].
    """

    key: tuple[int, str]
    latent: torch.Tensor
    sigma: torch.Tensor
    text_features: torch.Tensor
    text_mask: torch.Tensor


def teacache_rescale(relative_change: float) -> float:
    """TeaCache's Mochi polynomial of a relative L1 change; infinite (compute) beyond its rising range."""
    if not relative_change <= TEACACHE_RISING_LIMIT:  # also NaN
        return math.inf
    value = 0.0
    for coefficient in TEACACHE_MOCHI_COEFFICIENTS:  # Horner
        value = value * relative_change + coefficient
    return value


class StepCache:
    """The cache state of one sampling run and the per-step decision.

    Args:
        spec: the StepCacheSpec.
        num_steps: steps in the run (the last one always computes).
        ctx: ParallelContext or None; its sequence and CFG groups reduce the indicator.
    """

    def __init__(self, spec: StepCacheSpec, num_steps: int, ctx=None, attention=None):
        if not isinstance(spec, StepCacheSpec):
            raise TypeError(f"spec must be a StepCacheSpec, got {type(spec)}")
        self.spec = spec
        self.num_steps = num_steps
        self.ctx = ctx
        self.attention = attention  # parallel.kernel.AttentionConfig for the DiT, or None (the default)
        self._previous: dict[tuple[int, str], torch.Tensor] = {}  # indicator of the previous step, local keys
        self._residual: dict[tuple[int, str], torch.Tensor] = {}  # [1, S_local, Dx] cached residual, local keys
        self._ready: set[tuple[int, str]] = set()  # keys with a cached residual on their ranks (every rank knows)
        self._accumulated = 0.0
        self._computed: list[int] = []
        self._skipped: list[int] = []
        self._changes: list[tuple[int, float]] = []

    @property
    def stats(self) -> CacheStats:
        return CacheStats(tuple(self._computed), tuple(self._skipped), tuple(self._changes))

    @torch.no_grad()
    def predict(self, model, step: int, evaluations: list[Evaluation], needed: list[tuple[int, str]]) -> dict:
        """Run (or skip the blocks of) every DiT call this rank makes at `step`.

        Every rank of the pool calls this once per step, also with no evaluation of its own (the
        unconditional CFG rank at a cfg-1 step): the indicator reduction is collective.

        Args:
            model: a MochiDiT.
            step: the step index (0-based, in order).
            evaluations: this rank's calls, in the same order on every rank of a sequence group.
            needed: the keys the whole pool evaluates at this step (all samples, all needed branches).

        Returns:
            {key: [1, 12, T, H, W] prediction in the compute dtype} for this rank's evaluations.
        """
        first_block = self.spec.kind is StepCacheKind.FIRST_BLOCK
        states, indicators, rope = {}, {}, None
        for evaluation in evaluations:
            state = model.embed(evaluation.latent, evaluation.sigma, evaluation.text_features,
                                evaluation.text_mask, ctx=self.ctx, rope=rope,
                                attention=self.attention)  # x [1, S_local, Dx]
            rope = state.rope  # one table for every call of the step (same latent size and layout)
            if first_block:
                block_input = state.x
                model.run_blocks(state, 0, 1, ctx=self.ctx)
                indicator = state.x - block_input  # [1, S_local, Dx] block 0's residual
                del block_input
            else:
                indicator = model.first_block_modulated_input(state)  # [1, S_local, Dx]
            # Padding rows (sequence shards are padded to equal length) are not tokens: leave them out.
            indicators[evaluation.key] = indicator[:, : self._real_rows(state)]  # [1, S_real, Dx]
            states[evaluation.key] = state

        forced = step == 0 or step == self.num_steps - 1 or not self._ready.issuperset(needed)
        compute = True if forced else self._decide(step, self._reduce(indicators))
        if first_block and not compute:
            indicators.clear()  # FBCache compares with the last computed step's residual
        self._previous.update(indicators)
        del indicators
        if compute:
            self._accumulated = 0.0
            for key in states:  # replaced below; freed first so old and new never coexist
                self._residual.pop(key, None)

        predictions = {}
        for key in list(states):
            state = states.pop(key)  # so each call's tokens and RoPE table are freed after its head
            if compute:
                stack_input = state.x
                model.run_blocks(state, 1 if first_block else 0, None, ctx=self.ctx)
                self._residual[key] = state.x - stack_input  # [1, S_local, Dx]
                del stack_input
            else:
                state.x = state.x + self._residual[key]  # [1, S_local, Dx]
            predictions[key] = model.head(state, ctx=self.ctx)
            del state
        del rope
        if compute:
            self._ready.update(needed)
            self._computed.append(step)
        else:
            self._skipped.append(step)
        return predictions

    def _real_rows(self, state) -> int:
        """Rows of this rank's shard that hold real tokens (the rest is padding)."""
        rows = state.x.shape[1]
        if self.ctx is None:
            return rows
        return max(0, min(rows, state.video_len - self.ctx.sp_rank * rows))

    def _reduce(self, indicators: dict) -> tuple[float, float]:
        """(sum |now - before|, sum |before|) over every rank's indicators, in fp64."""
        difference = reference = 0.0
        for key, now in indicators.items():
            before = self._previous[key]
            difference += (now - before).abs_().sum(dtype=torch.float64).item()
            reference += before.abs().sum(dtype=torch.float64).item()
        if self.ctx is None:
            return difference, reference
        sums = torch.tensor([difference, reference], dtype=torch.float64, device=self.ctx.device)  # [2]
        for group, degree in ((self.ctx.sp_group, self.ctx.sp_degree), (self.ctx.cfg_group, self.ctx.cfg_degree)):
            if group is not None:  # sequence shards first, then the CFG halves
                with collective("step-cache all_reduce"):  # a peer that died or stopped: CollectiveError
                    dist.all_reduce(sums, group=group)
                self.ctx.sent_bytes["step_cache"] += 2 * (degree - 1) * sums.numel() * sums.element_size() // degree
        difference, reference = sums.tolist()
        return difference, reference

    def _decide(self, step: int, sums: tuple[float, float]) -> bool:
        """True: compute this step. Updates TeaCache's accumulator."""
        difference, reference = sums
        relative = difference / reference if reference > 0 else math.inf
        self._changes.append((step, relative))
        if self.spec.kind is StepCacheKind.FIRST_BLOCK:
            return not relative < self.spec.threshold
        self._accumulated += teacache_rescale(relative)
        return not self._accumulated < self.spec.threshold
