"""Streaming video writers (frames are piped to ffmpeg as they are produced) and readers.

Writers append frames chunk by chunk, so memory stays bounded by one chunk however long the video;
the file is written under a hidden temporary name and only renamed onto its final name when it is
complete (see :mod:`slotgen.atomic`), so a crash never leaves a truncated file that looks finished.

- :class:`MP4Writer`: H.264 (``libx264``), ``yuv420p``, ``+faststart`` -> plays in browsers.
- :class:`LosslessWriter`: FFV1 in Matroska (``.mkv``), ``bgr0`` -> RGB24 round-trips bit for bit.
- :func:`open_writer`: pick one by extension.
- :func:`read_video`, :func:`iter_video_frames`, :func:`probe_video`: read back with PyAV, a decoder
  independent of the ffmpeg binary used for writing (PyAV is imported lazily; it is a test extra).
- :func:`append_videos`: concatenate two MP4s into a new one (stream copy when possible).

Frames are ``np.ndarray`` uint8 ``(N, H, W, 3)`` RGB; sizes are given as ``(W, H)`` like ffmpeg.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import imageio_ffmpeg
import numpy as np

from slotgen.atomic import PartialFile, atomic_output, check_output_path
from slotgen.errors import SlotgenError, WriteError, one_line, write_cause

DEFAULT_CRF = 18  # x264 constant rate factor: 0 lossless ... 51 worst; 18 is visually near-lossless
DEFAULT_PRESET = "medium"

_W = TypeVar("_W", bound="_FFmpegWriter")


def _check_fps(fps: float | Fraction) -> float | Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
        raise SlotgenError(f"fps must be a positive number, got {fps!r}")
    return fps


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise SlotgenError(f"video size must be (width, height) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


class _FFmpegWriter:
    """Shared machinery: an ffmpeg process fed raw RGB24 frames, writing to an atomic temp file."""

    codec: str = ""
    pix_fmt_out: str = ""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | Fraction,
        size: tuple[int, int],
        *,
        keep_partial_on_error: bool = False,
    ) -> None:
        self.fps = _check_fps(fps)
        self.size: tuple[int, int] = _check_size(size)  # (W, H)
        self._check_size_for_codec(self.size)
        self._partial = PartialFile(path)
        self.path: Path = self._partial.final
        self.keep_partial_on_error = keep_partial_on_error
        self.frames_written: int = 0
        self._closed = False
        # ffmpeg's messages go to a log file (read for the cause of a failure), not to our stderr
        self._log = tempfile.TemporaryFile(prefix="slotgen-ffmpeg-")
        self._gen = _ffmpeg_pipe(self._command(), self._log)
        self._proc: subprocess.Popen[bytes] | None = self._gen.send(None)  # starts ffmpeg

    def _command(self) -> list[str]:
        """ffmpeg reading raw RGB frames from its stdin (the command imageio-ffmpeg's ``write_frames``
        builds for these settings)."""
        w, h = self.size
        fps = self.fps if isinstance(self.fps, Fraction) else Fraction(self.fps).limit_denominator()
        return [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}",
                "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an", "-vcodec", self.codec,
                "-pix_fmt", self.pix_fmt_out, "-v", "error", *self._output_params(), str(self._partial.tmp)]

    def _ffmpeg_log(self) -> str:
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def _write_error(self, error: BaseException | None) -> WriteError:
        """The one-line error for a failed write: the path and the cause (from errno, ffmpeg's log, the disk)."""
        if self._proc is not None and self._proc.poll() is None and isinstance(error, (BrokenPipeError, OSError)):
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        log = self._ffmpeg_log()
        broken = isinstance(error, BrokenPipeError) or (error is not None and "Broken pipe" in str(error))
        cause = write_cause(None if broken else error, log, str(self.path.parent))
        rc = self._proc.returncode if self._proc is not None else None
        if cause == "unknown cause" or (broken and not any(c in cause for c in ("ENOSPC", "EROFS", "EACCES", "EPERM"))):
            last = [ln for ln in log.strip().splitlines() if ln.strip()]
            detail = f": {one_line(last[-1], 120)}" if last else ""
            cause = f"ffmpeg stopped (exit status {rc}{', broken pipe (EPIPE)' if broken else ''}){detail}"
        return WriteError(f"cannot write {str(self.path)!r}: {cause}", str(self.path), cause)

    def _check_size_for_codec(self, size: tuple[int, int]) -> None:
        """Hook: reject sizes the codec cannot store exactly."""

    def _output_params(self) -> list[str]:
        raise NotImplementedError

    @property
    def tmp_path(self) -> Path:
        """Where the video is being written until :meth:`close` renames it to :attr:`path`."""
        return self._partial.tmp

    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 ``(N, H, W, 3)`` (or a single ``(H, W, 3)`` frame), RGB."""
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        if frames.ndim == 3:
            frames = frames[None]
        w, h = self.size
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(
                f"expected uint8 frames of shape (N, {h}, {w}, 3), got {frames.dtype} {tuple(frames.shape)}"
            )
        if frames.shape[0] == 0:
            return
        try:
            self._gen.send(np.ascontiguousarray(frames))  # one pipe write for the whole chunk
        except (OSError, StopIteration, RuntimeError) as e:
            raise self._write_error(e) from None
        self.frames_written += frames.shape[0]

    def close(self) -> Path:
        """Finish the file (ffmpeg flushes and writes the index) and rename it onto :attr:`path`.

        Raises ``ValueError`` if no frame was written (an empty video is not a valid file) and
        ``OSError`` if ffmpeg failed; in both cases the temporary file is removed.
        """
        if self._closed:
            if self._partial.done and self.path.exists():
                return self.path
            raise RuntimeError(f"writer for {self.path} was aborted")
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        self._closed = True
        try:
            try:
                self._gen.close()  # waits for ffmpeg to exit
            except (OSError, RuntimeError) as e:
                raise self._write_error(e) from None
            rc = self._proc.returncode if self._proc is not None else 0
            if rc != 0:
                raise self._write_error(None)
            if not self._partial.tmp.exists() or self._partial.tmp.stat().st_size == 0:
                raise self._write_error(None)
            try:
                return self._partial.commit()
            except OSError as e:
                cause = write_cause(e, '', str(self.path.parent))
                raise WriteError(f"cannot write {str(self.path)!r}: {cause}", str(self.path), cause) from None
        except BaseException:
            self._partial.discard()
            raise

    def abort(self) -> None:
        """Stop ffmpeg and remove the temporary file; the final path is left untouched. Idempotent."""
        if self._partial.done:
            return
        self._closed = True
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
            # imageio-ffmpeg logs "No frames have been written" when a writer closes empty; an aborted
            # writer's file is discarded anyway (e.g. a segment opened after a checkpoint, then not needed)
            log = logging.getLogger("imageio_ffmpeg")
            quiet, log.disabled = log.disabled, True
            try:
                self._gen.close()
            finally:
                log.disabled = quiet
            if self._proc is not None:
                self._proc.wait()
        finally:
            self._partial.discard()

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self.keep_partial_on_error and self.frames_written > 0 and not self._closed:
            self.close()  # a playable partial video under the final name
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close()/abort() must not leave a stray temporary file behind.
        try:
            if not self._partial.done:
                self.abort()
        except Exception:
            pass


class MP4Writer(_FFmpegWriter):
    """Stream RGB frames into a browser-playable MP4 (H.264 ``libx264``, ``yuv420p``, ``+faststart``).

    Args:
        path: final file name; its directory must exist. The video appears there on :meth:`close`.
        fps: frames per second (float or Fraction, e.g. ``Fraction(24000, 1001)``).
        size: ``(W, H)``; both must be even (4:2:0 chroma subsampling).
        crf: x264 constant rate factor (0 lossless ... 51 worst, default 18).
        preset: x264 speed/size preset (``ultrafast`` ... ``veryslow``).
        keep_partial_on_error: when used as a context manager and the block raises, finalise what was
            written into a playable file under ``path`` instead of removing it (default: remove).
    """

    codec = "libx264"
    pix_fmt_out = "yuv420p"

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | Fraction,
        size: tuple[int, int],
        *,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        keep_partial_on_error: bool = False,
    ) -> None:
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise SlotgenError(f"crf must be an integer in 0..51, got {crf!r}")
        self.crf = crf
        self.preset = preset
        super().__init__(path, fps, size, keep_partial_on_error=keep_partial_on_error)

    def _check_size_for_codec(self, size: tuple[int, int]) -> None:
        if size[0] % 2 or size[1] % 2:
            raise SlotgenError(f"MP4 (H.264 yuv420p) needs an even width and height, got {size[0]}x{size[1]}")

    def _output_params(self) -> list[str]:
        return ["-preset", self.preset, "-crf", str(self.crf), "-movflags", "+faststart", "-f", "mp4"]


class LosslessWriter(_FFmpegWriter):
    """Stream RGB frames into a lossless FFV1/Matroska file (``.mkv``); RGB24 round-trips exactly.

    FFV1 stores ``bgr0`` (RGB, no colour-space conversion, no subsampling), so decoding to RGB24
    gives back the input bit for bit. Any size is allowed. Arguments as :class:`MP4Writer`.
    """

    codec = "ffv1"
    pix_fmt_out = "bgr0"

    def _output_params(self) -> list[str]:
        # level 3: per-slice CRCs, so corruption is detected on decode
        return ["-level", "3", "-slicecrc", "1", "-f", "matroska"]


VideoWriter = MP4Writer | LosslessWriter


def _ffmpeg_pipe(cmd: list[str], log):
    """A generator that owns one ffmpeg process: ``send(None)`` starts it and returns the ``Popen``,
    ``send(frames)`` writes a uint8 array to its stdin, ``close()`` closes stdin and waits for it to
    exit (killed instead when the generator ends by another BaseException than GeneratorExit).

    ffmpeg starts in a session of its own (``start_new_session``, done in C between fork and exec), so
    a Ctrl-C at the terminal reaches slotgen, which finishes the video, and not ffmpeg. No Python code
    runs in the forked child: ``preexec_fn`` (imageio-ffmpeg's ``os.setpgrp``) runs the interpreter
    there, which frees objects of the parent's other threads, and one holding a PyAV frame
    reformatter (``read_video``) waits forever in the child for codec threads that fork did not copy:
    the render thread then hangs in ``Popen``. ffmpeg's messages go to ``log``."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    kill = False
    try:
        frames = yield p
        while True:
            p.stdin.write(frames)  # a C-contiguous uint8 array: one pipe write, no copy
            frames = yield
    except (GeneratorExit, Exception):  # closed, or a failed write: ffmpeg exits once stdin is closed
        if not isinstance(sys.exc_info()[1], GeneratorExit):
            raise
    except BaseException:  # KeyboardInterrupt, SystemExit: do not wait for ffmpeg to finish the file
        kill = True
        raise
    finally:
        if kill and p.poll() is None:
            p.kill()
        try:
            p.stdin.close()
        except OSError:  # ffmpeg already gone: the buffered bytes have nowhere to go
            pass
        p.wait()


def open_writer(
    path: str | os.PathLike[str],
    fps: float | Fraction,
    size: tuple[int, int],
    **kwargs: Any,
) -> VideoWriter:
    """Open the writer for ``path``'s extension: ``.mp4`` -> :class:`MP4Writer`, ``.mkv`` -> :class:`LosslessWriter`.

    ``kwargs`` go to the writer (``crf``/``preset`` only make sense for MP4).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return MP4Writer(path, fps, size, **kwargs)
    if suffix == ".mkv":
        return LosslessWriter(path, fps, size, **kwargs)
    raise SlotgenError(
        f"unsupported video extension {suffix or '(none)'!r} for {str(path)!r}: use .mp4 (H.264) or .mkv (lossless)"
    )


# ---------------------------------------------------------------------- reading (PyAV)


def _import_av() -> Any:
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SlotgenError("reading videos needs PyAV: pip install 'slotgen[test]' (or pip install av)") from err
    return av


def _check_input(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SlotgenError(f"video file {str(p)!r} does not exist")
    return p


def iter_video_frames(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """Yield the frames of ``path`` one by one as uint8 RGB ``(H, W, 3)``, decoded with PyAV."""
    av = _import_av()
    with av.open(str(_check_input(path))) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")  # (H, W, 3)


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a whole video with PyAV to uint8 RGB ``(N, H, W, 3)`` (holds all frames in memory)."""
    frames = list(iter_video_frames(path))
    if not frames:
        raise SlotgenError(f"video file {str(path)!r} has no frames")
    return np.stack(frames)  # (N, H, W, 3)


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe the first video stream: ``{frames, width, height, fps, codec, pix_fmt}``.

    ``frames`` comes from the container index (MP4) or, where the container has none (Matroska),
    from counting packets; nothing is decoded. ``fps`` is a float.
    """
    av = _import_av()
    with av.open(str(_check_input(path))) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        frames = int(stream.frames or 0)
        if frames <= 0:
            frames = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return {
            "frames": frames,
            "width": int(ctx.width),
            "height": int(ctx.height),
            "fps": float(rate) if rate else 0.0,
            "codec": str(ctx.name),
            "pix_fmt": str(ctx.pix_fmt),
        }


# ---------------------------------------------------------------------- appending


def _ffmpeg_meta(path: Path) -> dict[str, Any]:
    """Size/fps/codec of a video as reported by the bundled ffmpeg (no PyAV needed)."""
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta: dict[str, Any] = next(gen)
    except (OSError, RuntimeError, StopIteration) as err:
        raise SlotgenError(f"cannot read video {str(path)!r}: {str(err).splitlines()[0] if str(err) else err}") from err
    finally:
        gen.close()
    return meta


def _stream_signature(path: Path) -> tuple[Any, ...] | None:
    """What must match for a lossless stream-copy concat: codec, size, rate, pix_fmt, SPS/PPS.

    Returns None when PyAV is not installed (then we cannot compare the parameter sets).
    """
    try:
        import av
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        return (
            ctx.name,
            ctx.width,
            ctx.height,
            ctx.pix_fmt,
            stream.average_rate,
            stream.time_base,
            bytes(ctx.extradata or b""),
        )


def _run_ffmpeg(args: list[str], what: str) -> None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error", *args]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        cause = write_cause(None, proc.stderr)
        if cause != "unknown cause" and "(E" in cause:
            raise WriteError(f"{what} failed: {cause}", None, cause)
        raise SlotgenError(f"{what} failed: {detail}")


def _concat_escape(path: Path) -> str:
    """Quote a path for an ffmpeg concat-demuxer list file."""
    return "'" + str(path.resolve()).replace("'", "'\\''") + "'"


def append_videos(
    first: str | os.PathLike[str],
    second: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mode: Literal["auto", "copy", "reencode"] = "auto",
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> Path:
    """Write ``first`` followed by ``second`` into the MP4 ``out`` (atomically; ``out`` may be ``first``).

    An ``.mkv`` ``out`` joins two FFV1 files by stream copy (bit-exact: every FFV1 frame is intra).

    Both inputs must have the same frame size and frame rate. ``mode``:

    - ``"copy"``: ffmpeg concat demuxer with ``-c copy`` -- lossless and fast, but only valid when
      both streams were encoded with identical parameters (same SPS/PPS);
    - ``"reencode"``: ffmpeg concat filter, re-encoded with libx264 (``crf``, ``preset``), yuv420p;
    - ``"auto"`` (default): copy when PyAV confirms the streams are identical in codec, size, rate,
      pixel format and parameter sets (e.g. both written by :class:`MP4Writer` with the same
      settings), otherwise re-encode.

    The result has ``frames(first) + frames(second)`` frames and ``+faststart``.
    """
    a, b = _check_input(first), _check_input(second)
    final = check_output_path(out)
    if final.suffix.lower() == ".mkv":
        return _append_lossless(a, b, final)
    if final.suffix.lower() != ".mp4":
        raise SlotgenError(f"append_videos writes MP4 or lossless MKV; output {str(final)!r} must end in .mp4 or .mkv")
    if mode not in ("auto", "copy", "reencode"):
        raise ValueError(f"mode must be 'auto', 'copy' or 'reencode', got {mode!r}")
    meta_a, meta_b = _ffmpeg_meta(a), _ffmpeg_meta(b)
    if tuple(meta_a["size"]) != tuple(meta_b["size"]):
        raise SlotgenError(
            f"cannot append {str(b)!r} ({meta_b['size'][0]}x{meta_b['size'][1]}) to {str(a)!r} "
            f"({meta_a['size'][0]}x{meta_a['size'][1]}): frame sizes differ"
        )
    if abs(float(meta_a["fps"]) - float(meta_b["fps"])) > 1e-3:
        raise SlotgenError(
            f"cannot append {str(b)!r} ({meta_b['fps']} fps) to {str(a)!r} ({meta_a['fps']} fps): frame rates differ"
        )
    if mode == "auto":
        sig_a = _stream_signature(a)
        copyable = sig_a is not None and sig_a[0] == "h264" and sig_a == _stream_signature(b)
        mode = "copy" if copyable else "reencode"

    with atomic_output(final) as tmp:
        if mode == "copy":
            with tempfile.TemporaryDirectory(prefix="slotgen-concat-") as tmpdir:
                listing = Path(tmpdir) / "inputs.txt"
                listing.write_text(f"file {_concat_escape(a)}\nfile {_concat_escape(b)}\n", encoding="utf-8")
                _run_ffmpeg(
                    ["-f", "concat", "-safe", "0", "-i", str(listing), "-map", "0:v:0", "-c", "copy",
                     "-movflags", "+faststart", "-f", "mp4", str(tmp)],
                    f"appending {str(b)!r} to {str(a)!r}",
                )  # fmt: skip
        else:
            _run_ffmpeg(
                ["-i", str(a), "-i", str(b),
                 "-filter_complex", "[0:v:0][1:v:0]concat=n=2:v=1:a=0[v]", "-map", "[v]",
                 "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
                 "-an", "-movflags", "+faststart", "-f", "mp4", str(tmp)],
                f"appending {str(b)!r} to {str(a)!r}",
            )  # fmt: skip
    return final


def _append_lossless(a: Path, b: Path, final: Path) -> Path:
    """``a`` + ``b`` (both FFV1 in Matroska, same size and rate) into ``final`` by stream copy."""
    sig_a, sig_b = _stream_signature(a), _stream_signature(b)
    for path, sig in ((a, sig_a), (b, sig_b)):
        if sig is not None and sig[0] != "ffv1":
            raise SlotgenError(f"cannot join {str(path)!r} into the lossless {str(final)!r}: it is {sig[0]}, not FFV1")
    if sig_a is not None and sig_a[1:5] != sig_b[1:5]:
        raise SlotgenError(f"cannot append {str(b)!r} to {str(a)!r}: size, pixel format or frame rate differ")
    return concat_copy(a, b, final)


def concat_copy(first: str | os.PathLike[str], second: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """``first`` + ``second`` into ``out`` by stream copy (ffmpeg concat demuxer), atomically; no checks.

    For two files written by the same writer with the same settings (the segments of one render):
    the result is exactly their frames, in order. ``out`` picks the container (.mp4 or .mkv)."""
    a, b, final = Path(first), Path(second), Path(out)
    fmt = ["-movflags", "+faststart", "-f", "mp4"] if final.suffix.lower() == ".mp4" else ["-f", "matroska"]
    with atomic_output(final) as tmp:
        with tempfile.TemporaryDirectory(prefix="slotgen-concat-") as tmpdir:
            listing = Path(tmpdir) / "inputs.txt"
            listing.write_text(f"file {_concat_escape(a)}\nfile {_concat_escape(b)}\n", encoding="utf-8")
            _run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-map", "0:v:0", "-c", "copy", *fmt,
                         str(tmp)], f"appending {str(b)!r} to {str(a)!r}")
    return final
