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
