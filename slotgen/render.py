"""Render a storyboard: storyboard → engine → memory → decoder → writers. The CLI is a thin layer on this.

:class:`Renderer` binds a validated storyboard to a model bundle and a memory policy, and streams the
video: every chunk's frames go straight to the writers (MP4 and, optionally, a lossless FFV1 copy), so
memory stays bounded however long the video is. Frames a chunk decodes past the storyboard's end are
kept as ``pending`` (a continuation emits them first, so render(A then B) == render(A) + resume(B)).

:func:`render` (and :func:`slotgen.resume.resume`) add files on top: the writers, an optional ``--stats``
JSON and a snapshot (:meth:`Renderer.snapshot_payload`, written in the :mod:`slotgen.snapshot` format).
Both take ``should_stop`` (polled after every chunk): a stop finishes the current chunk, closes playable
videos with every frame so far and writes a snapshot (``<output>.snapshot.pt`` unless one was asked for).
:class:`InterruptGuard` turns SIGINT/SIGTERM into such a stop for the duration of a render.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slotgen.atomic import atomic_write_bytes
from slotgen.engine.generator import ChunkResult, EngineOptions, StreamingEngine
from slotgen.engine.overlap import DecodeWorker
from slotgen.memory import build_policy
from slotgen.models import ModelBundle, load_model
from slotgen.snapshot import ENGINE_OPTIONS, default_snapshot_path, write_snapshot


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

    def __init__(self, storyboard, bundle: ModelBundle | None = None, device: str = "cpu", compile: bool = False,
                 overlap: bool = True):
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
            compile=compile,
        )
        self.policy = build_policy(storyboard.memory, len(self.bundle.transformer.blocks), phi=self.bundle.slot_phi)
        self.engine = StreamingEngine(self.bundle, self.policy, self.options)
        self.frames_emitted = 0  # video frames handed to the writers so far
        self.pending = np.zeros((0, height, width, 3), np.uint8)  # decoded past the timeline's end
        self.source: str | None = None  # the story's first storyboard file, kept across resumes
        self.overlap = overlap  # decode + write on a worker thread while the next chunk generates

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
        # Overlapped, the worker decodes and writes chunk c while the engine generates chunk c + 1.
        # Events, timings and should_stop stay on this thread, in generation order: an event's
        # frames_done counts the chunk's frames as handed over (written by the time stream returns).
        worker = DecodeWorker(self.engine.decoder.decode_chunk, lambda res, frames: emit(frames), depth=1,
                              device=self.bundle.device) if self.overlap else None
        last = t0
        try:
            res: ChunkResult
            for res in self.engine.run(self.storyboard, decode=worker is None):
                if worker is None:
                    emit(res.frames)
                else:
                    worker.put(res, res.latents)  # blocks while the previous chunk is still being written
                now = time.perf_counter()
                seconds, last = now - last, now  # the stream's period, chunk to chunk
                chunk_seconds.append(seconds)
                prompt_chunks.append(res.prompt_index)
                done = min(total, self.engine.geometry.first_frame(self.engine.next_chunk))
                if on_chunk is not None:
                    on_chunk(ChunkEvent(res.chunk, total_chunks, res.prompt_index, res.prompt, done, total,
                                        self.storyboard.fps, seconds, now - t0, res.recached_frames))
                if should_stop is not None and should_stop() and done < total:
                    interrupted = True
                    break
        finally:
            if worker is not None:
                worker.close()  # every generated chunk decoded and written: the state is as without overlap
        return RenderReport(
            frames=self.frames_emitted - start, chunks=self.engine.next_chunk, elapsed=time.perf_counter() - t0,
            chunk_seconds=chunk_seconds, prompt_chunks=prompt_chunks, outputs=[], warnings=[],
            interrupted=interrupted, memory_stats=self.policy.stats(), first_frame=start, total_frames=total,
        )


    # -- snapshots ----------------------------------------------------------------------------------
    def _model_info(self) -> dict:
        from slotgen.models import BUILTIN_MODELS

        bundle = self.bundle
        cfg = bundle.transformer.config
        transformer = {}
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
                    "rope_max_seq_len"):
            value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
            transformer[key] = list(value) if isinstance(value, (list, tuple)) else value
        spec = self.storyboard.model
        if spec not in BUILTIN_MODELS and Path(spec).expanduser().exists():
            spec = str(Path(spec).expanduser().resolve())  # a resume may run from another directory
        return {
            "spec": spec,
            "name": bundle.name,
            "digest": bundle.digest,
            "settings": bundle.settings.to_dict(),
            "num_layers": len(bundle.transformer.blocks),
            "transformer": transformer,
            "dtype": str(bundle.dtype).replace("torch.", ""),
            "device": str(bundle.device),
        }

    def snapshot_payload(self, *, video: str | Path | None = None, video_first_frame: int = 0,
                         lossless: str | Path | None = None, lossless_first_frame: int = 0,
                         interrupted: bool = False) -> dict:
        """Where the render stands, as tensors and plain data (the payload of :mod:`slotgen.snapshot`)."""
        from slotgen import __version__

        engine = self.engine
        sb = self.storyboard
        return {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "slotgen_version": __version__,
            "model": self._model_info(),
            "storyboard": sb.to_yaml(),
            "storyboard_source": self.source or sb.source_path,
            "seed": int(self.options.seed),
            "options": {k: getattr(self.options, k) for k in ENGINE_OPTIONS},
            "position": {
                "chunk": int(engine.next_chunk),
                "frames_emitted": int(self.frames_emitted),
                "total_frames": int(sb.total_frames),
                "interrupted": bool(interrupted),
            },
            "prompt": engine.prompt,
            "prompt_index": engine.prompt_index,
            "engine": engine.state_dict(),
            "pending": torch.from_numpy(np.ascontiguousarray(self.pending).copy()),
            "video": {
                "path": None if video is None else str(Path(video).resolve()),
                "first_frame": int(video_first_frame),
                "lossless": None if lossless is None else str(Path(lossless).resolve()),
                "lossless_first_frame": int(lossless_first_frame),
            },
        }

    def save_snapshot(self, path: str | Path, **video) -> Path:
        """Write :meth:`snapshot_payload` (``video``: its keyword arguments) to ``path`` atomically."""
        return write_snapshot(path, self.snapshot_payload(**video))


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
        report.snapshot = str(renderer.save_snapshot(snapshot, interrupted=report.interrupted, **video))
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
