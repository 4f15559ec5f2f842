"""Render a storyboard: storyboard → engine → memory → decoder → writers. The CLI is a thin layer on this.

:class:`Renderer` binds a validated storyboard to a model bundle and a memory policy, and streams the
video: every chunk's frames go straight to the writers (MP4 and, optionally, a lossless FFV1 copy), so
memory stays bounded however long the video is. Frames a chunk decodes past the storyboard's end are
kept as ``pending`` (a continuation emits them first, so render(A then B) == render(A) + resume(B)).

:func:`render` and :func:`resume` add files on top: the writers, an optional ``--stats`` JSON and a
snapshot (:mod:`slotgen.snapshot`). Both take ``should_stop`` (polled after every chunk): a stop
finishes the current chunk, closes playable videos with every frame so far and writes a snapshot
(``<output>.snapshot.pt`` unless one was asked for). :class:`InterruptGuard` turns SIGINT/SIGTERM
into such a stop for the duration of a render.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from slotgen.atomic import atomic_write_bytes
from slotgen.errors import SlotgenError, SnapshotError
from slotgen.engine.generator import ChunkResult, EngineOptions, StreamingEngine
from slotgen.memory import build_policy
from slotgen.models import ModelBundle, load_model


@dataclass
class ChunkEvent:
    """Progress information after each chunk (what the progress bar shows)."""

    chunk: int  # 0-based index of the chunk just finished
    total_chunks: int
    prompt_index: int
    prompt: str
    frames_done: int  # video frames emitted so far
    total_frames: int
    fps: int
    chunk_seconds: float
    elapsed: float
    recached_frames: int = 0

    @property
    def video_seconds_done(self) -> float:
        return self.frames_done / self.fps

    @property
    def generation_fps(self) -> float:
        return self.frames_done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class RenderReport:
    frames: int  # frames written by this run (a resume starts at ``first_frame``)
    chunks: int
    elapsed: float
    chunk_seconds: list[float]
    prompt_chunks: list[int]  # prompt index driving each chunk
    outputs: list[str]
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    snapshot: str | None = None
    memory_stats: dict = field(default_factory=dict)
    first_frame: int = 0  # global index of the first frame this run wrote
    total_frames: int = 0  # frames of the whole timeline

    def to_dict(self) -> dict:
        return asdict(self)


class Renderer:
    """A storyboard bound to a model and a memory policy; renders (and continues) its timeline."""

    def __init__(self, storyboard, bundle: ModelBundle | None = None, device: str = "cpu"):
        self.bundle = bundle if bundle is not None else load_model(storyboard.model, device=device)
        self.storyboard = storyboard
        s = self.bundle.settings
        width, height = storyboard.check_resolution(self.bundle.stride, s.resolution)
        sampler = storyboard.sampler
        self.options = EngineOptions(
            seed=storyboard.seed,
            fps=storyboard.fps,
            width=width,
            height=height,
            steps=(sampler.steps if sampler and sampler.steps else s.steps),
            shift=(sampler.shift if sampler and sampler.shift else s.shift),
        )
        self.policy = build_policy(storyboard.memory, len(self.bundle.transformer.blocks), phi=self.bundle.slot_phi)
        self.engine = StreamingEngine(self.bundle, self.policy, self.options)
        self.frames_emitted = 0  # video frames handed to the writers so far
        self.pending = np.zeros((0, height, width, 3), np.uint8)  # decoded past the timeline's end

    @classmethod
    def from_snapshot(cls, snapshot, storyboard=None, *, bundle: ModelBundle | None = None, device: str = "cpu",
                      model: str | None = None) -> "Renderer":
        """A renderer positioned where ``snapshot`` stopped, for ``storyboard`` (default: the snapshot's).

        ``storyboard`` must extend the snapshot's (see :func:`slotgen.snapshot.extend_storyboard`). The
        model is ``bundle``, else loaded from ``model`` or the snapshot's model spec; its weights digest
        must match the snapshot's.
        """
        from slotgen.snapshot import check_model

        sb = storyboard if storyboard is not None else snapshot.storyboard
        if bundle is None:
            bundle = load_model(model or snapshot.model["spec"], device=device)
        check_model(snapshot, bundle)
        renderer = cls(sb, bundle=bundle)
        opts = {k: getattr(renderer.options, k) for k in snapshot.options}
        if opts != snapshot.options:
            diff = ", ".join(f"{k} {snapshot.options[k]!r} -> {opts[k]!r}" for k in opts if opts[k] != snapshot.options[k])
            raise SnapshotError(f"snapshot {snapshot.path or ''}: the continuation's engine options differ ({diff}); "
                                f"a continuation keeps the snapshot's")
        try:
            renderer.engine.load_state_dict(snapshot.engine_state)
        except SlotgenError:
            raise
        except Exception as e:  # noqa: BLE001 - shapes/keys of an untrusted state
            reason = " ".join(str(e).split())[:160]
            raise SnapshotError(f"snapshot {snapshot.path or ''}: its state does not fit this model/policy ({reason})") from None
        renderer.frames_emitted = snapshot.frames_emitted
        renderer.pending = np.array(snapshot.pending, dtype=np.uint8, copy=True)
        renderer.source = snapshot.source or None  # the story's first storyboard file, kept across resumes
        return renderer

    @property
    def size(self) -> tuple[int, int]:
        return self.options.width, self.options.height

    def warnings(self) -> list[str]:
        out = []
        for p in self.storyboard.prompts:
            unknown = self.engine.text.unknown_words(p.text)
            if unknown:
                out.append(f"the model '{self.bundle.name}' does not know the words {', '.join(map(repr, unknown))} "
                           f"in prompt {p.text!r}; they are ignored")
        return out

    def total_chunks(self) -> int:
        return self.engine.geometry.num_chunks(self.storyboard.total_frames)

    def stream(self, writers: list, on_chunk: Callable[[ChunkEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> RenderReport:
        """Generate the rest of the timeline, writing frames to every writer as each chunk is decoded.

        ``should_stop`` is polled after every chunk (an interrupt finishes the current chunk first).
        """
        total = self.storyboard.total_frames
        total_chunks = self.total_chunks()
        start = self.frames_emitted
        t0 = time.perf_counter()
        chunk_seconds: list[float] = []
        prompt_chunks: list[int] = []
        interrupted = False

        def emit(frames: np.ndarray) -> None:
            take = max(0, min(len(frames), total - self.frames_emitted))
            if take:
                for w in writers:
                    w.write(frames[:take])
                self.frames_emitted += take
            self.pending = frames[take:]

        if len(self.pending):
            emit(self.pending)
        res: ChunkResult
        for res in self.engine.run(self.storyboard):
            emit(res.frames)
            chunk_seconds.append(res.seconds)
            prompt_chunks.append(res.prompt_index)
            if on_chunk is not None:
                on_chunk(ChunkEvent(res.chunk, total_chunks, res.prompt_index, res.prompt, self.frames_emitted,
                                    total, self.storyboard.fps, res.seconds, time.perf_counter() - t0,
                                    res.recached_frames))
            if should_stop is not None and should_stop() and self.frames_emitted < total:
                interrupted = True
                break
        return RenderReport(
            frames=self.frames_emitted - start, chunks=self.engine.next_chunk, elapsed=time.perf_counter() - t0,
            chunk_seconds=chunk_seconds, prompt_chunks=prompt_chunks, outputs=[], warnings=[],
            interrupted=interrupted, memory_stats=self.policy.stats(), first_frame=start, total_frames=total,
        )


def write_stats(path: str | Path, renderer: Renderer, report: RenderReport) -> None:
    """The ``--stats`` JSON: memory statistics and timings (what ``slotgen inspect`` reads)."""
    doc = {
        "format": "slotgen-stats",
        "version": 1,
        "model": renderer.bundle.name,
        "storyboard": renderer.storyboard.source_path,
        "policy": renderer.policy.name,
        "frames": report.frames,
        "chunks": report.chunks,
        "chunk_seconds": report.chunk_seconds,
        "prompt_chunks": report.prompt_chunks,
        "memory": report.memory_stats,  # the policy's stats() taken when the stream ended
    }
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


class InterruptGuard:
    """SIGINT/SIGTERM → "stop after the current chunk", installed only inside a ``with`` block.

    Use the guard itself as ``should_stop``. The first signal sets :attr:`signum` (and calls
    ``on_signal``); a second one raises :class:`KeyboardInterrupt` (abort without saving). The previous
    handlers are restored on exit. Outside the main thread it installs nothing (signals cannot be caught
    there) and never stops.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def __enter__(self) -> "InterruptGuard":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __call__(self) -> bool:
        return self.signum is not None


def debug_chunk_line(ev: ChunkEvent) -> None:
    """With ``SLOTGEN_DEBUG_CHUNKS=1``: one machine-readable line per finished chunk on stderr."""
    if os.environ.get("SLOTGEN_DEBUG_CHUNKS") == "1":
        print(f"slotgen-chunk {ev.chunk} frames {ev.frames_done} of {ev.total_frames}", file=sys.stderr, flush=True)


def _chain(*callbacks):
    callbacks = [c for c in callbacks if c is not None]

    def on_chunk(ev: ChunkEvent) -> None:
        for c in callbacks:
            c(ev)

    return on_chunk


def stream_to_files(renderer: Renderer, output: str | Path, *, lossless: str | Path | None = None,
                    on_chunk: Callable[[ChunkEvent], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
                    snapshot: str | Path | None = None, snapshot_video: dict | None = None,
                    write_snapshot: bool = True) -> RenderReport:
    """Stream the rest of ``renderer``'s timeline into ``output`` (+ ``lossless``), then stats and snapshot.

    On an exception every writer is aborted (no file appears). When ``should_stop`` stops the render
    the videos are closed (playable, every frame so far) and a snapshot is written to ``snapshot`` or,
    if none was asked for, ``<output>.snapshot.pt``. ``snapshot_video`` overrides what the snapshot
    records about where the frames went. ``write_snapshot=False`` leaves the snapshot to the caller
    (``resume --append`` writes it after joining the videos).
    """
    from slotgen.snapshot import default_snapshot_path, save_snapshot
    from slotgen.video.writer import open_writer

    fps = renderer.storyboard.fps
    writers = [open_writer(output, fps, renderer.size)]
    try:
        if lossless is not None:
            writers.append(open_writer(lossless, fps, renderer.size))
        report = renderer.stream(writers, on_chunk=_chain(on_chunk, debug_chunk_line), should_stop=should_stop)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    report.outputs = [str(w.close()) for w in writers]
    if stats is not None:
        write_stats(stats, renderer, report)
        report.outputs.append(str(stats))
    if snapshot is None and report.interrupted:
        snapshot = default_snapshot_path(output)
    if snapshot is not None and write_snapshot:
        video = snapshot_video or {"video": output, "video_first_frame": report.first_frame, "lossless": lossless,
                                   "lossless_first_frame": report.first_frame}
        report.snapshot = str(save_snapshot(snapshot, renderer, interrupted=report.interrupted, **video))
    return report


def render(storyboard, output: str | Path, *, lossless: str | Path | None = None, bundle: ModelBundle | None = None,
           device: str = "cpu", on_chunk: Callable[[ChunkEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
           snapshot: str | Path | None = None) -> RenderReport:
    """Render ``storyboard`` to ``output`` (.mp4, or .mkv for lossless FFV1) and optional extras.

    ``snapshot``: also write a snapshot at the end, for :func:`resume`. An interrupted render (see
    ``should_stop``) always writes one (``<output>.snapshot.pt`` by default).
    """
    renderer = Renderer(storyboard, bundle=bundle, device=device)
    report = stream_to_files(renderer, output, lossless=lossless, on_chunk=on_chunk, should_stop=should_stop,
                             stats=stats, snapshot=snapshot)
    report.warnings = renderer.warnings()
    return report


def continuation(snapshot, *, storyboard=None, prompt: str | None = None, duration: float | None = None):
    """The combined timeline a resume renders: the snapshot's storyboard + new prompts (shifted).

    Times in ``storyboard`` (a more.yaml) and ``duration`` count from the END of the snapshot's
    storyboard. With neither, an unfinished snapshot (an interrupted render) continues its own
    storyboard; a finished one is an error.
    """
    from slotgen.snapshot import extend_storyboard

    if storyboard is not None and prompt is not None:
        raise SlotgenError("give either --storyboard or --prompt/--duration, not both")
    if (prompt is None) != (duration is None):
        raise SlotgenError("--prompt and --duration go together: what to show next, and for how long")
    if prompt is not None and not prompt.strip():
        raise SlotgenError("--prompt must not be empty")
    combined = extend_storyboard(snapshot.storyboard, storyboard, prompt=prompt and prompt.strip(), duration=duration)
    if combined.total_frames <= snapshot.frames_emitted:
        if storyboard is None and prompt is None:
            raise SlotgenError(f"the snapshot's storyboard is complete ({snapshot.frames_emitted} frames); give "
                               f"--storyboard more.yaml or --prompt/--duration to continue the story")
        raise SlotgenError(f"the continuation adds no frames at {combined.fps} fps; make it longer")
    return combined


def resume(snapshot, output: str | Path, *, storyboard=None, prompt: str | None = None,
           duration: float | None = None, lossless: str | Path | None = None, append: bool = False,
           append_to: str | Path | None = None, bundle: ModelBundle | None = None, device: str = "cpu",
           model: str | None = None, on_chunk: Callable[[ChunkEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
           snapshot_out: str | Path | None = None) -> RenderReport:
    """Continue ``snapshot`` (a :class:`~slotgen.snapshot.Snapshot` or a path) into ``output``.

    The timeline is :func:`continuation` (new prompt times count from the END of the snapshot's
    storyboard). ``output`` gets the continuation's frames only, or, with ``append``/``append_to``, a
    copy of the original video (``append_to``, else the video recorded in the snapshot) followed by
    the continuation (MP4 only; see :func:`~slotgen.video.writer.append_videos`). ``lossless`` is a
    lossless copy of the continuation alone. ``snapshot_out`` snapshots the end of the continuation,
    so a story can be extended again and again. The frames are bit-identical to rendering the
    combined timeline in one go (same device and dtype).
    """
    from slotgen.snapshot import Snapshot, load_snapshot

    snap = snapshot if isinstance(snapshot, Snapshot) else load_snapshot(snapshot)
    combined = continuation(snap, storyboard=storyboard, prompt=prompt, duration=duration)
    original = append_source(snap, append, append_to, output)
    renderer = Renderer.from_snapshot(snap, combined, bundle=bundle, device=device, model=model)
    return continue_to_files(renderer, output, lossless=lossless, original=original, on_chunk=on_chunk,
                             should_stop=should_stop, stats=stats, snapshot_out=snapshot_out)


def continue_to_files(renderer: Renderer, output: str | Path, *, lossless: str | Path | None = None,
                      original: str | Path | None = None, on_chunk: Callable[[ChunkEvent], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
                      snapshot_out: str | Path | None = None) -> RenderReport:
    """The file side of :func:`resume` for a renderer made by :meth:`Renderer.from_snapshot`.

    ``original``: join this MP4 (checked by :func:`append_source`) and the continuation into ``output``.
    """
    from slotgen.atomic import check_output_path
    from slotgen.snapshot import default_snapshot_path, save_snapshot
    from slotgen.video.writer import append_videos

    output = Path(output)
    start = renderer.frames_emitted
    lossless_rec = {"lossless": lossless, "lossless_first_frame": start}
    if original is None:
        report = stream_to_files(renderer, output, lossless=lossless, on_chunk=on_chunk, should_stop=should_stop,
                                 stats=stats, snapshot=snapshot_out,
                                 snapshot_video={"video": output, "video_first_frame": start, **lossless_rec})
        report.warnings = renderer.warnings()
        return report

    check_output_path(output)
    part = output.with_name(f".{output.stem}.continuation-{os.getpid()}.mp4")
    try:
        report = stream_to_files(renderer, part, lossless=lossless, on_chunk=on_chunk, should_stop=should_stop,
                                 stats=stats, write_snapshot=False)  # written below, after the join
        append_videos(original, part, output)
    finally:
        part.unlink(missing_ok=True)
    report.outputs[0] = str(output)
    target = snapshot_out
    if target is None and report.interrupted:
        target = default_snapshot_path(output)
    if target is not None:
        report.snapshot = str(save_snapshot(target, renderer, interrupted=report.interrupted, video=output,
                                            video_first_frame=0, **lossless_rec))
    report.warnings = renderer.warnings()
    return report


def append_source(snap, append: bool, append_to: str | Path | None, output: str | Path) -> Path | None:
    """The MP4 a resume with ``--append`` joins the continuation to (None: no append), checked up front.

    It must exist and hold exactly the snapshot's frames so far (else the join would repeat or skip some).
    """
    if not append and append_to is None:
        return None
    from slotgen.video.writer import probe_video

    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise SlotgenError(f"--append writes an MP4; -o {str(output)!r} must end in .mp4")
    if append_to is not None:
        original = Path(append_to)
    else:
        recorded = snap.video.get("path")
        if recorded is None:
            raise SlotgenError("the snapshot records no video to append to; pass --append-to original.mp4")
        if snap.video.get("first_frame", 0) != 0:
            raise SlotgenError(f"the snapshot's video {recorded!r} starts at frame {snap.video['first_frame']}, "
                               f"not at the story's start; pass --append-to with the whole video")
        original = Path(recorded)
    if not original.is_file():
        raise SlotgenError(f"video to append to {str(original)!r} does not exist; pass --append-to original.mp4")
    if original.suffix.lower() != ".mp4":
        raise SlotgenError(f"--append joins MP4 videos; {str(original)!r} is not an .mp4")
    try:
        frames = probe_video(original)["frames"]
    except SlotgenError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV errors on a broken file
        raise SlotgenError(f"cannot read video {str(original)!r}: {' '.join(str(e).split())[:120]}") from None
    if frames != snap.frames_emitted:
        raise SlotgenError(f"video {str(original)!r} has {frames} frames but the snapshot continues after frame "
                           f"{snap.frames_emitted}; pass --append-to with the video this snapshot was taken from")
    return original
