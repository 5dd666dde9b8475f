"""Where a pool failure gets its kind: `FailureKind`, `PoolError`, and `classify`.

Every failure the driver sees is one of a few kinds, decided by the type of what happened (an
actor death, a deadline, the rank's own exception type), never by reading a message. Front doors
turn the kind into advice (more ranks for out of memory, ...); `PoolError.original` keeps the
rank's own exception for logs and callers that want it.
"""

from enum import Enum

from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..mochi.parallel.collective import CollectiveError


class FailureKind(Enum):
    """What went wrong on a rank, in the order a root cause is looked for (lowest `blame` first)."""

    RANK_DIED = "the rank's process died"
    OUT_OF_MEMORY = "the rank ran out of memory"
    BAD_REQUEST = "the rank refused the request"
    RANK_ERROR = "the rank raised an error"
    RANK_SILENT = "the rank stopped answering"
    COLLECTIVE = "the rank's collective failed waiting for a peer"
    STOPPED = "the service stopped the pool"  # not a rank's failure: replaced, released or shut down

    @property
    def blame(self) -> int:
        """Lower = more likely the root cause. A collective failure is an effect of another rank's
        trouble, so a rank that stayed silent while its peers' collectives timed out is blamed."""
        return _BLAME[self]


_BLAME = {FailureKind.RANK_DIED: 0, FailureKind.OUT_OF_MEMORY: 1, FailureKind.BAD_REQUEST: 1,
          FailureKind.RANK_ERROR: 1, FailureKind.RANK_SILENT: 2, FailureKind.COLLECTIVE: 3, FailureKind.STOPPED: 4}


def rank_behind(entered: dict[int, int]) -> int | None:
    """The one rank that entered fewer collectives than all the others, or None when the counts do not
    single one out (all equal, a tie at the lowest count, or fewer than two ranks known).

    Every rank of a layout runs the same collectives in the same order, so while the ranks are in step
    their counts agree; the one that hung (or was stopped) outside a collective is the one whose
    peers went on into the next collective and waited there for it.

    Args:
        entered: rank -> collectives it entered (`mochi.parallel.collective.CollectiveLedger`).
    """
    if len(entered) < 2:
        return None
    lowest = min(entered.values())
    behind = [rank for rank, count in entered.items() if count == lowest]
    return behind[0] if len(behind) == 1 else None


def rank_exception(error: BaseException) -> BaseException:
    """The exception raised inside the rank (Ray wraps it in a RayTaskError), else `error` itself."""
    if isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        return cause if cause is not None else error
    return error


def classify(error: BaseException) -> FailureKind:
    """The kind of one rank's failure, from the exception types alone."""
    import torch

    if isinstance(error, RayActorError):
        return FailureKind.RANK_DIED
    if isinstance(error, GetTimeoutError):
        return FailureKind.RANK_SILENT
    original = rank_exception(error)
    if isinstance(original, (torch.OutOfMemoryError, MemoryError)):
        return FailureKind.OUT_OF_MEMORY
    if isinstance(original, CollectiveError):
        return FailureKind.COLLECTIVE
    if isinstance(original, ValueError):  # the request's values: what the user can change
        return FailureKind.BAD_REQUEST
    return FailureKind.RANK_ERROR  # anything else, a TypeError included, is a fault in the code


def describe(error: BaseException) -> str:
    """One line for the message: the rank's exception type and the first line of its text."""
    if isinstance(error, RayActorError):
        return f"the rank's process died ({type(error).__name__}: killed, out of memory, or crashed)"
    original = rank_exception(error)
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0][:500] if lines else ''}"


class PoolError(RuntimeError):
    """A rank died, raised, or did not answer in time. The whole group is gone (every actor was
    killed); the next request builds a new pool.

    Attributes:
        kind: a FailureKind (what the front doors turn into advice).
        rank: the rank blamed (the root cause when several failed), or None for the pool as a whole.
        verb: the actor call that failed ("load", "step", ...).
        cause: one line saying what happened.
        original: the rank's own exception (None for a silent rank).
    """

    def __init__(self, kind: FailureKind, rank: int | None, verb: str, cause: str,
                 original: BaseException | None = None):
        self.kind, self.rank, self.verb, self.cause, self.original = kind, rank, verb, cause, original
        who = f"rank {rank}" if rank is not None else "the pool"
        super().__init__(
            f"{who} failed in {verb}(): {cause}. Every rank of this pool was stopped; the next "
            "run starts a fresh pool (if it fails again, check `ray status` and the actor logs under "
            "/tmp/ray/session_latest/logs)."
        )

    def __reduce__(self):  # picklable across processes with its fields
        return (type(self), (self.kind, self.rank, self.verb, self.cause, self.original))


class RunInterrupted(Exception):
    """The progress callback asked to stop (returned False). The ranks dropped the run and the pool
    is ready for the next one."""
