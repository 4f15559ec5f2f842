"""User-facing errors.

Anything the user can fix (a bad storyboard, a missing file, a refused snapshot, an unknown model)
raises :class:`SlotgenError`. The CLI prints its one-line message and exits with ``exit_code`` (2),
never a traceback. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations


def one_line(text: object, limit: int = 200) -> str:
    """``text`` (an exception or message) on one line, at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


class SlotgenError(Exception):
    """An error caused by the user's input; ``str(err)`` is a complete one-line explanation."""

    exit_code = 2


class StoryboardError(SlotgenError):
    """A storyboard problem, formatted ``path:LINE: what was expected``."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ModelError(SlotgenError):
    """A model or checkpoint that cannot be loaded (missing file, wrong keys, needs a download)."""


class SnapshotError(SlotgenError):
    """A snapshot that is refused (truncated, corrupted, other model, future version, unsafe)."""


class WriteError(SlotgenError):
    """An output that could not be written: the path and the cause (disk full, read-only, permission, ffmpeg)."""

    def __init__(self, message: str, path: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.path, self.cause = path, cause


_CAUSES = (  # errno name, strerror text (as ffmpeg and the OS print it), what the user reads
    ("ENOSPC", "No space left on device", "no space left on the device"),
    ("EROFS", "Read-only file system", "the file system is read-only"),
    ("EACCES", "Permission denied", "permission denied"),
    ("EPERM", "Operation not permitted", "operation not permitted (an immutable file or directory?)"),
    ("EDQUOT", "Disk quota exceeded", "disk quota exceeded"),
    ("EIO", "Input/output error", "input/output error"),
)


def write_cause(error: BaseException | None = None, text: str = "", directory: str | None = None) -> str:
    """Why a write failed, in words with the errno name: from the exception's errno, else from an
    error text (ffmpeg's log), else by probing ``directory`` (free space, writability)."""
    import errno as _errno
    import os

    code = getattr(error, "errno", None)
    if isinstance(code, int) and code in _errno.errorcode:
        name = _errno.errorcode[code]
        for n, _, words in _CAUSES:
            if n == name:
                return f"{words} ({name})"
        if name == "EPIPE":
            return "the encoder (ffmpeg) stopped reading (EPIPE)"
        return f"{os.strerror(code).lower()} ({name})"
    blob = f"{text}\n{error or ''}"
    for name, strerror, words in _CAUSES:
        if strerror.lower() in blob.lower():
            return f"{words} ({name})"
    if directory is not None:
        try:
            st = os.statvfs(directory)
            if st.f_bavail * st.f_frsize < 1 << 16:
                return "no space left on the device (ENOSPC)"
        except OSError:
            pass
        if not os.access(directory, os.W_OK):
            return "the directory is not writable (EACCES/EROFS)"
    if error is not None and str(error).strip():
        return one_line(str(error).strip().splitlines()[0], 160)
    return "unknown cause"
