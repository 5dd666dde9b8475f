"""`CollectiveError`: a collective (all-to-all, all-gather, ring exchange) that failed on this rank.

A collective fails on a healthy rank when a peer died or stopped answering (gloo and NCCL raise a
plain RuntimeError after the group's timeout). Raising our own type at the call site lets the pool
tell "this rank waited for a peer" from "this rank broke" by type, never by reading the message, so
the rank that stopped answering is the one blamed.
"""

from contextlib import contextmanager


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
def collective(operation: str):
    """Run a torch.distributed call; a RuntimeError it raises becomes a CollectiveError."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        raise CollectiveError(operation, f"{type(error).__name__}: {lines[0] if lines else ''}") from error
