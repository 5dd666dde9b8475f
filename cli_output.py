"""The CLI's output file, created before any rank starts and removed again if the run fails.

Checking a path's folder and permissions is not enough: a 300-character file name, or a folder
such as /proc that refuses new files, passed those checks and failed in PyAV after the whole
generation. Creating the file first asks the file system itself.
"""

import errno
import os


class OutputFileError(ValueError):
    """The output file cannot be created or written; the message says why and what to change."""


class OutputFile:
    """Creates (or opens for writing) the output now; `discard()` removes it if this run created it.

    Args:
        path: the output path (already checked for its form: a .mp4 file in an existing folder).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.created = True
        except FileExistsError:  # the user's existing file: must be writable, and is never removed
            try:
                descriptor = os.open(path, os.O_WRONLY)
            except OSError as error:
                raise OutputFileError(_reason(path, error)) from None
            self.created = False
        except OSError as error:
            raise OutputFileError(_reason(path, error)) from None
        os.close(descriptor)

    def discard(self) -> None:
        """The run failed: remove the file if this run created it (nothing half-written stays behind)."""
        if self.created:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.created = False


def _reason(path: str, error: OSError) -> str:
    name = os.path.basename(path)
    if error.errno == errno.ENAMETOOLONG:
        limit = os.pathconf(os.path.dirname(path) or ".", "PC_NAME_MAX")
        return (f"--output {path}: the file name is {len(name.encode())} bytes, longer than this file system allows "
                f"({limit}); choose a shorter name")
    return (f"--output {path}: cannot create the file there ({os.strerror(error.errno or 0)}); choose a path in a "
            "folder you can write to")
