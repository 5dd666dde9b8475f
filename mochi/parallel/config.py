"""How a world of ranks is split: CFG x Ulysses x Ring.

`ParallelConfig` is validated once, before any process group exists, so a bad choice fails in the
node or the CLI with a message naming the valid degrees instead of deep inside a collective.
`auto` is a plain function so a planner can later replace or wrap it.
"""

from dataclasses import dataclass

from ..constants import NUM_HEADS


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(values: list[int]) -> str:
    """'2, 3, 4 or 6' for [2, 3, 4, 6]."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism; world_size = cfg_degree * ulysses_degree * ring_degree.

    Args:
        world_size: number of ranks (one device each).
        cfg_degree: 1, or 2 to run the conditional and unconditional branches on separate halves.
        ulysses_degree: ranks that split attention heads by all-to-all; must divide num_heads.
        ring_degree: ranks that pass K/V blocks around a ring; any positive integer.
        num_heads: the model's attention heads (24 for Mochi-1; tiny test models have fewer).
    """

    world_size: int
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    num_heads: int = NUM_HEADS

    def __post_init__(self):
        for name in ("world_size", "cfg_degree", "ulysses_degree", "ring_degree", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(
                f"cfg={self.cfg_degree} is not supported; use 1 (no CFG split) or 2 (conditional and "
                "unconditional branches on separate ranks), and put other factors on ulysses or ring"
            )
        if self.num_heads % self.ulysses_degree:
            valid = [d for d in _divisors(self.num_heads) if d > 1]
            raise ValueError(
                f"ulysses={self.ulysses_degree} does not divide {self.num_heads} heads; use "
                f"{_choices(valid) if valid else '1'}, or put the factor on ring"
            )
        product = self.cfg_degree * self.ulysses_degree * self.ring_degree
        if product != self.world_size:
            raise ValueError(
                f"cfg x ulysses x ring = {self.cfg_degree} x {self.ulysses_degree} x {self.ring_degree} = "
                f"{product}, but world_size is {self.world_size}; choose degrees whose product is "
                f"{self.world_size} (for example {_describe(auto(self.world_size, self.num_heads))})"
            )

    @property
    def sp_degree(self) -> int:
        """Sequence-parallel ranks per CFG branch: ulysses x ring."""
        return self.ulysses_degree * self.ring_degree


def _describe(config: "ParallelConfig") -> str:
    return f"cfg={config.cfg_degree}, ulysses={config.ulysses_degree}, ring={config.ring_degree}"


def largest_ulysses_degree(sp_degree: int, num_heads: int = NUM_HEADS) -> int:
    """The largest Ulysses degree for `sp_degree` sequence ranks: divides both them and the heads
    (Ulysses is the cheaper split inside a node; Ring takes the remaining factor)."""
    return max(d for d in _divisors(sp_degree) if num_heads % d == 0)


def auto(world_size: int, num_heads: int = NUM_HEADS, num_tokens: int | None = None, use_cfg: bool = True) -> ParallelConfig:
    """Pick degrees for a world: CFG first (when the sampler uses CFG and the world is even), then
    the largest Ulysses degree that divides both the remaining ranks and the head count, then Ring
    for what is left.

    Args:
        world_size: number of ranks.
        num_heads: the model's attention heads.
        num_tokens: video tokens per forward, if known; a sequence degree larger than this would
            leave ranks with nothing but padding, so it is rejected.
        use_cfg: whether the sampler runs an unconditional branch (cfg scale != 1).

    Returns:
        A validated ParallelConfig.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    cfg = 2 if use_cfg and world_size % 2 == 0 else 1
    sp = world_size // cfg
    ulysses = largest_ulysses_degree(sp, num_heads)
    config = ParallelConfig(world_size, cfg, ulysses, sp // ulysses, num_heads)
    if num_tokens is not None and config.sp_degree > num_tokens:
        raise ValueError(
            f"{config.sp_degree} sequence-parallel ranks for only {num_tokens} video tokens; use at most "
            f"{num_tokens} sequence ranks (fewer ranks, or a larger video)"
        )
    return config
