"""`CollectiveError`: a collective (all-to-all, all-gather, ring exchange) that failed on this rank;
`CollectiveLedger`: how many collectives this rank entered and completed.

A collective fails on a healthy rank when a peer died or stopped answering (gloo raises a plain
RuntimeError after the group's timeout). Raising our own type at the call site lets the pool tell
"this rank waited for a peer" from "this rank broke" by type, never by reading the message, so the
rank that stopped answering is the one blamed.

NCCL is different: `work.wait()` does not raise on a timeout; the watchdog aborts the communicator
and by default kills the process, so the waiting ranks die together with (or before) the one that
hung. The ledger survives them: each rank mirrors its two counts into a 16-byte file (a private
pool's rendezvous folder), and the driver blames the rank that entered fewer collectives than the
others (`workers.failures.rank_behind`).
"""

import mmap
import os
import struct
from contextlib import contextmanager

_COUNTS = struct.Struct("<qq")  # entered, completed


class CollectiveLedger:
    """Counts of the collectives this rank entered and completed (every rank of a layout runs the
    same sequence of collectives, so the counts agree while the ranks are in step).

    Args:
        path: a file to mirror the counts into (created, 16 bytes, memory-mapped: an update is a
            store into shared memory, no system call), or None to keep them in this process only.
    """

    def __init__(self, path: str | None = None):
        self.entered = self.completed = 0
        self.path = path
        self._map = None
        if path is not None:
            with open(path, "wb") as file:
                file.write(_COUNTS.pack(0, 0))
            with open(path, "r+b") as file:
                self._map = mmap.mmap(file.fileno(), _COUNTS.size)

    def enter(self) -> None:
        self.entered += 1
        self._mirror()

    def complete(self) -> None:
        self.completed += 1
        self._mirror()

    def _mirror(self) -> None:
        if self._map is not None:
            _COUNTS.pack_into(self._map, 0, self.entered, self.completed)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def read_ledger(path: str) -> tuple[int, int] | None:
    """(entered, completed) from a ledger file, or None when there is none (the rank never joined)."""
    try:
        with open(path, "rb") as file:
            data = file.read(_COUNTS.size)
    except OSError:
        return None
    return _COUNTS.unpack(data) if len(data) == _COUNTS.size else None


def ledger_path(folder: str, rank: int) -> str:
    """Where rank `rank` mirrors its ledger inside a private pool's rendezvous folder."""
    return os.path.join(folder, f"collectives.rank{rank}")


class CollectiveError(RuntimeError):
    """A collective failed on this rank, most likely because a peer died or stopped answering.

    Attributes:
        operation: the collective, e.g. "all_to_all" or "ring exchange".
        detail: the backend's own error, one line.
    """

    def __init__(self, operation: str, detail: str):
        self.operation, self.detail = operation, detail
        super().__init__(f"{operation} failed (a peer rank died or stopped answering): {detail}")

    def __reduce__(self):  # travels from the rank to the driver (Ray pickles it) with its fields
        return type(self), (self.operation, self.detail)


@contextmanager
def collective(operation: str, ledger: CollectiveLedger | None = None):
    """Run a torch.distributed call; a RuntimeError it raises becomes a CollectiveError. With a
    ledger, the call is counted as entered before and as completed after it returns."""
    if ledger is not None:
        ledger.enter()
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        raise CollectiveError(operation, f"{type(error).__name__}: {lines[0] if lines else ''}") from error
    if ledger is not None:
        ledger.complete()
