"""Video outputs that are made durable in the middle of a render (crash safety, docs/SNAPSHOTS.md).

A streaming writer keeps its file under a hidden temporary name until it is closed, so a ``kill -9``
would lose every frame written so far. :class:`SegmentedOutput` writes the frames into a *segment*
instead; :meth:`SegmentedOutput.seal` closes the segment (a complete, playable, fsync'ed file named
``.<stem>.segment-<pid><ext>`` beside the output) and :meth:`SegmentedOutput.join` appends it to the
output (stream copy, atomic rename). A periodic snapshot sits between the two::

    seal()   -> segment complete on disk
    snapshot -> records {target, base, segment, frames}: the join that is due (a write-ahead record)
    join()   -> target = base + segment (atomic), segment removed

So at every instant the newest snapshot can be completed: if the join has happened the target holds
the snapshot's frames; if not, the segment named in the snapshot is still there and
:func:`complete_joins` (run by ``resume`` before anything else) performs it.

:func:`remove_stale` deletes the temporary and segment files that dead processes left next to an output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from slotgen.atomic import PARTIAL_MARKER, _fsync_dir, check_output_path
from slotgen.errors import SlotgenError

SEGMENT_MARKER = ".segment-"


def segment_path(target: Path) -> Path:
    """The hidden segment of ``target`` owned by this process: ``.<stem>.segment-<pid><ext>``."""
    suffix = target.suffix
    stem = target.name[: -len(suffix)] if suffix else target.name
    return target.with_name(f".{stem}{SEGMENT_MARKER}{os.getpid()}{suffix}")


def count_frames(path: Path) -> int:
    """Frames of a finished video (decoded by the bundled ffmpeg; no PyAV needed)."""
    import imageio_ffmpeg

    try:
        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except (OSError, RuntimeError, ValueError) as e:
        raise SlotgenError(f"cannot read video {str(path)!r}: {' '.join(str(e).split())[:120]}") from None


def join_videos(base: Path | None, segment: Path, target: Path) -> Path:
    """``target`` = ``base`` followed by ``segment`` (``base`` None: the segment becomes ``target``).

    Atomic: ``target`` is replaced by a rename. MP4 segments are stream-copied (same encoder settings);
    FFV1/Matroska segments are stream-copied too (every FFV1 frame is intra: the join is bit-exact).
    """
    from slotgen.video.writer import concat_copy

    if base is None:
        os.replace(segment, target)
        _fsync_dir(target.parent)
        return target
    concat_copy(base, segment, target)
    segment.unlink(missing_ok=True)
    return target


class _as_target:
    """Errors about the hidden segment name the output the user asked for."""

    def __init__(self, out: "SegmentedOutput"):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from slotgen.errors import WriteError, write_cause

        if exc_type is None:
            return False
        if isinstance(exc, WriteError):
            cause = exc.cause or str(exc)
        elif isinstance(exc, OSError):
            cause = write_cause(exc, "", str(self.out.target.parent))
        else:
            return False
        raise WriteError(f"cannot write {str(self.out.target)!r}: {cause}", str(self.out.target), cause) from None


class SegmentedOutput:
    """A streaming video output (``.mp4`` or ``.mkv``) whose frames can be made durable mid-render.

    ``base`` is the video already holding this output's earlier frames (``resume --append``: the
    original; ``None``: the output starts empty). Frames go to a segment; :meth:`seal` + :meth:`join`
    append it to ``target``. Used as a writer (``write``/``close``/``abort``) by :class:`slotgen.render.Renderer`.
    """

    def __init__(self, target: str | Path, fps: float, size: tuple[int, int], *, base: str | Path | None = None):
        from slotgen.video.writer import open_writer

        self.target = check_output_path(target)
        self.fps, self.size = fps, size
        self.base: Path | None = None if base is None else Path(base)
        self.segment = segment_path(self.target)
        self._open = lambda: open_writer(self.segment, fps, size)
        with _as_target(self):
            self._writer = self._open()  # opened now: a bad extension or size fails before any work
        self.sealed = False  # a complete segment waits to be joined
        self.recorded = False  # ... and a snapshot names it: it must survive until joined

    @property
    def path(self) -> Path:
        return self.target

    @property
    def frames_pending(self) -> int:
        return 0 if self._writer is None else self._writer.frames_written

    def write(self, frames: np.ndarray) -> None:
        if self.sealed:
            raise RuntimeError(f"segment of {self.target} is sealed; join() it first")
        with _as_target(self):
            if self._writer is None:
                self._writer = self._open()
            self._writer.write(frames)

    def prepare(self) -> None:
        """Open the next segment now, on the calling thread (the render's own, after a checkpoint's join).

        Starting ffmpeg points this process's stderr at ffmpeg's log for a moment
        (:class:`~slotgen.video.writer.VideoWriter`); opened lazily by :meth:`write` on the overlapped
        decode's worker thread, that moment would swallow whatever the render's thread printed then
        (progress, warnings, the lines tests read)."""
        if self._writer is None and not self.sealed:
            with _as_target(self):
                self._writer = self._open()

    def seal(self) -> dict | None:
        """Close the current segment (complete and fsync'ed under its hidden name); None if it is empty
        (an opened, empty segment is dropped).

        Returns the join record a snapshot keeps: ``{"target", "base", "segment"}``."""
        if self._writer is not None and self._writer.frames_written == 0:
            self._writer.abort()
            self._writer = None
        if self._writer is None:
            return None
        with _as_target(self):
            self._writer.close()
        self._writer = None
        self.sealed = True
        return {"target": str(self.target.resolve()), "base": None if self.base is None else str(self.base.resolve()),
                "segment": str(self.segment.resolve())}

    def join(self) -> None:
        """Append the sealed segment to the target (atomically); the target becomes the base."""
        if not self.sealed:
            return
        with _as_target(self):
            join_videos(self.base, self.segment, self.target)
        self.base = self.target
        self.sealed = self.recorded = False

    def close(self) -> Path:
        """Seal and join what is left; the target is complete. Raises ``ValueError`` if nothing was ever written."""
        self.seal()
        if not self.sealed and self.base is None:
            raise ValueError(f"no frames were written to {self.target}")
        self.join()
        return self.target

    def abort(self) -> None:
        """Drop the unsealed segment (the target keeps what was joined). Idempotent."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self.sealed and not self.recorded:  # a segment a snapshot names is kept: resume joins it
            self.segment.unlink(missing_ok=True)
        self.sealed = False


def complete_joins(joins: list[dict]) -> list[str]:
    """Finish the joins a snapshot recorded (a crash between its seal and its join); returns the targets joined.

    Each record is ``{"target", "base", "segment", "frames"}`` (``frames``: what the target holds once
    joined). A segment that is gone was joined (the join removes it last); a target that already holds
    ``frames`` is left alone (its leftover segment removed). Anything else is refused with one line.
    """
    done = []
    for j in joins:
        target, segment, n = Path(j["target"]), Path(j["segment"]), int(j["frames"])
        base = None if j.get("base") is None else Path(j["base"])
        if not segment.is_file():
            continue
        if target.is_file() and count_frames(target) == n:
            segment.unlink(missing_ok=True)
            continue
        if base is not None and not base.is_file():
            raise SlotgenError(f"cannot complete {str(target)!r}: the video it continues, {str(base)!r}, is gone")
        have = 0 if base is None else count_frames(base)
        seg = count_frames(segment)
        if have + seg != n:
            raise SlotgenError(f"cannot complete {str(target)!r}: {str(base)!r} ({have} frames) + segment "
                               f"{str(segment)!r} ({seg} frames) != the snapshot's {n} frames")
        try:
            join_videos(base, segment, target)
        except (OSError, SlotgenError) as e:
            from slotgen.errors import WriteError, write_cause

            cause = e.cause if isinstance(e, WriteError) and e.cause else write_cause(e, str(e), str(target.parent))
            raise WriteError(f"cannot complete {str(target)!r} from the snapshot's segment: {cause}; the segment "
                             f"{str(segment)!r} is kept for the next try", str(target), cause) from None
        done.append(str(target))
    return done


_STALE = re.compile(r"(?:\.partial-|\.segment-)(\d+)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(output: str | Path, keep: set[str] = frozenset()) -> list[str]:
    """Delete hidden temporary/segment files of ``output`` left by dead processes (pid in the name).

    Files of live processes (another render of the same output) and paths in ``keep`` are left alone."""
    output = Path(output)
    suffix = output.suffix
    stem = output.name[: -len(suffix)] if suffix else output.name
    removed = []
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not (name.startswith(f".{stem}{PARTIAL_MARKER}") or name.startswith(f".{stem}{SEGMENT_MARKER}")
                or name.startswith(f"..{stem}{SEGMENT_MARKER}")):
            continue
        m = _STALE.search(name)
        if m is None or _alive(int(m.group(1))) or str(p.resolve()) in keep:
            continue
        try:
            p.unlink()
            removed.append(str(p))
        except OSError:
            pass
    return removed
