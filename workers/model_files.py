"""What a model file is on disk right now, so a live pool is never reused for weights that changed.

A pool is reused while its files are the same files. A path and a modification time are not
enough: a new file renamed over the old one can keep the old mtime (`cp -p`, `rsync -t`, `mv` of a
file downloaded earlier), and a file overwritten in place keeps its inode while the CPU ranks,
which memory-map their weights, would silently read the new bytes. So a file's identity is its
device and inode, size, mtime_ns and ctime_ns (ctime moves on every write, rename or `touch`, and
no user can set it back) and a hash of its safetensors header (tensor names, shapes, offsets).
`MochiService` checks it on every request and rebuilds the pool when it changed, saying why.

Why rebuild rather than give each rank its own copy: a copy costs one more DiT in memory per rank
(20 GB at bf16) on every run, while a changed file is rare and a rebuild costs one load.
"""

import errno
import hashlib
import os
import stat
import struct
from dataclasses import dataclass

HEADER_HASH_LIMIT = 64 * 2**20  # hash at most this much header (real headers are ~100 KB)


class ModelFileError(ValueError):
    """A model file that cannot be read now (deleted, unreadable, its folder closed); one line, with the fix.

    Attributes:
        path: the file.
        role: "dit" or "vae" (the input it was given to), or "" when unknown.
    """

    def __init__(self, path: str, role: str, message: str):
        self.path, self.role = path, role
        super().__init__(message)


@dataclass(frozen=True)
class FileIdentity:
    """Which bytes a path holds right now (equal identities: the same file, unchanged)."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    header_sha256: str

    def change_from(self, old: "FileIdentity") -> str:
        """In words, how this file differs from `old` (for the rebuild's log line)."""
        name = os.path.basename(self.path)
        if self.path != old.path:
            return f"{os.path.basename(old.path)} -> {name}"
        if (self.device, self.inode) != (old.device, old.inode):
            return f"{name} was replaced by another file (new inode)"
        if self.header_sha256 != old.header_sha256:
            return f"{name} has other tensors now (its header changed)"
        if self.size != old.size:
            return f"{name} changed size ({old.size} -> {self.size} bytes)"
        return f"{name} was written to (modification/change time moved)"


def _named(path: str, role: str) -> str:
    return f"{role} file {path}" if role else path


def _unreadable(path: str, role: str, error: OSError, when: str) -> ModelFileError:
    """The one-line message for a file that `os.stat` / `open` refused."""
    name = _named(path, role)
    when = f" {when}" if when else ""
    if error.errno in (errno.EACCES, errno.EPERM):
        return ModelFileError(path, role, f"{name}: permission denied{when} (the file or one of its folders is not "
                                          "readable by this user); fix its permissions (chmod) or choose another file")
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return ModelFileError(path, role, f"{name}: no such file{when}; give the path of the .safetensors file")
    return ModelFileError(path, role, f"{name}: cannot be read{when} ({os.strerror(error.errno or 0)}); check the "
                                      "disk and the path")


def model_file_problem(path: str, role: str = "") -> str | None:
    """None when `path` is a regular file this process can open, else the one-line reason (no such
    file / permission denied on it or a folder above / a directory)."""
    try:
        identify(path, role)
    except ModelFileError as error:
        return str(error)
    return None


def identify(path: str, role: str = "", when: str = "") -> FileIdentity:
    """The file's identity now; ModelFileError (one line, with the fix) when it cannot be read.

    Args:
        role: "dit" / "vae", named in the message.
        when: words placed after the reason, e.g. "now" (the live pool was loaded from it).
    """
    try:
        info = os.stat(path)
    except OSError as error:
        raise _unreadable(path, role, error, when) from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(path, role, f"{_named(path, role)} is a directory; give the path of the .safetensors file")
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            digest = hashlib.sha256(head)
            if len(head) == 8:
                (header_len,) = struct.unpack("<Q", head)
                digest.update(file.read(min(header_len, HEADER_HASH_LIMIT)))
    except OSError as error:
        raise _unreadable(path, role, error, when) from None
    return FileIdentity(os.path.abspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                        info.st_ctime_ns, digest.hexdigest())
