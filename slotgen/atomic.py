"""Atomic file output: write under a hidden temporary name, rename onto the final name when done.

A reader (a browser, a video player, a resumed run) therefore sees either the previous file or the
complete new one, never a half-written file under the final name. The temporary file lives in the
same directory as the final one (so ``os.replace`` is an atomic rename on the same filesystem) and
keeps the extension (so tools that pick a format from the name, like ffmpeg, still work)::

    with atomic_output("out/video.mp4") as tmp:   # tmp = out/.video.partial-<pid>-<rand>.mp4
        write_the_video(tmp)
    # out/video.mp4 now exists, fsync'ed; on an exception it is untouched and tmp is removed
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slotgen.errors import SlotgenError

PARTIAL_MARKER = ".partial-"  # part of every temporary name, e.g. ".video.partial-123-ab12cd.mp4"


def check_output_path(final_path: str | os.PathLike[str]) -> Path:
    """Validate an output path and return it as a :class:`Path`.

    Raises :class:`SlotgenError` if its directory does not exist or the path is a directory.
    """
    final = Path(final_path)
    if final.name in ("", ".", ".."):
        raise SlotgenError(f"output path {str(final_path)!r} does not name a file")
    directory = final.parent
    if not directory.is_dir():
        raise SlotgenError(f"output directory {str(directory)!r} does not exist (for {str(final)!r})")
    if final.is_dir():
        raise SlotgenError(f"output path {str(final)!r} is a directory")
    return final


def partial_path(final_path: str | os.PathLike[str]) -> Path:
    """A fresh hidden temporary name next to ``final_path``: ``.<stem>.partial-<pid>-<rand><ext>``.

    The pid says which process owns it; the random part keeps two writers of one process apart.
    """
    final = Path(final_path)
    suffix = final.suffix
    stem = final.name[: -len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}{PARTIAL_MARKER}{os.getpid()}-{secrets.token_hex(3)}{suffix}")


def _fsync_path(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), since setting it
    to read it back races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _give_mode(tmp: Path, final: Path) -> None:
    """Give the temporary file the permissions the final file would have had without it: the replaced
    file's own, else what a plain ``open`` creates (0o666 less the umask). Writers that create their file
    privately (``safetensors`` and ``tempfile`` create 0o600) would otherwise leave a file nobody else may
    read, where the file it replaces was readable."""
    try:
        mode = os.stat(final).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    try:
        os.chmod(tmp, mode)
    except OSError:  # a filesystem without modes (some mounts): keep what it has
        pass


class PartialFile:
    """A temporary file that becomes ``final`` on :meth:`commit` or disappears on :meth:`discard`.

    For outputs whose lifetime spans many calls (a video writer); use :func:`atomic_output` for a
    ``with`` block. The temporary file itself is created by whoever writes to :attr:`tmp`.
    """

    def __init__(self, final_path: str | os.PathLike[str]) -> None:
        self.final: Path = check_output_path(final_path)
        self.tmp: Path = partial_path(self.final)
        self.done: bool = False  # committed or discarded

    def commit(self) -> Path:
        """fsync the temporary file, rename it onto the final name, fsync the directory."""
        if self.done:
            raise RuntimeError(f"{self.final} was already committed or discarded")
        if not self.tmp.exists():
            raise FileNotFoundError(f"nothing was written to {self.tmp} (for {self.final})")
        _fsync_path(self.tmp)
        _give_mode(self.tmp, self.final)
        os.replace(self.tmp, self.final)
        self.done = True
        _fsync_dir(self.final.parent)
        return self.final

    def discard(self) -> None:
        """Remove the temporary file (if any); the final path is left untouched. Idempotent."""
        self.done = True
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_output(final_path: str | os.PathLike[str], *, keep_partial: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it onto ``final_path`` on success.

    On normal exit the temporary file is fsync'ed and ``os.replace``'d onto ``final_path`` (it must
    have been created). On an exception it is removed and ``final_path`` is untouched, unless
    ``keep_partial`` is true: then whatever was written is committed to ``final_path`` (if anything
    was) before the exception propagates.

    Raises :class:`SlotgenError` if the directory of ``final_path`` does not exist.
    """
    partial = PartialFile(final_path)
    try:
        yield partial.tmp
    except BaseException:
        if keep_partial and partial.tmp.exists():
            partial.commit()
        else:
            partial.discard()
        raise
    try:
        partial.commit()
    except BaseException:
        partial.discard()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename); returns the path."""
    with atomic_output(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(path)
