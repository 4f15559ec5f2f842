"""Render a storyboard: storyboard → engine → memory → decoder → writers. The CLI is a thin layer on this.

:class:`Renderer` binds a validated storyboard to a model bundle and a memory policy, and streams the
video: every chunk's frames go straight to the writers (MP4 and, optionally, a lossless FFV1 copy), so
memory stays bounded however long the video is. Frames a chunk decodes past the storyboard's end are
kept as ``pending`` (a continuation emits them first, so render(A then B) == render(A) + resume(B)).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from slotgen.atomic import atomic_write_bytes
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
    frames: int
    chunks: int
    elapsed: float
    chunk_seconds: list[float]
    prompt_chunks: list[int]  # prompt index driving each chunk
    outputs: list[str]
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    snapshot: str | None = None
    memory_stats: dict = field(default_factory=dict)

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
        self.policy = build_policy(storyboard.memory, len(self.bundle.transformer.blocks))
        self.engine = StreamingEngine(self.bundle, self.policy, self.options)
        self.frames_emitted = 0  # video frames handed to the writers so far
        self.pending = np.zeros((0, height, width, 3), np.uint8)  # decoded past the timeline's end

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
                on_chunk(ChunkEvent(res.chunk, self.total_chunks(), res.prompt_index, res.prompt, self.frames_emitted,
                                    total, self.storyboard.fps, res.seconds, time.perf_counter() - t0,
                                    res.recached_frames))
            if should_stop is not None and should_stop() and self.frames_emitted < total:
                interrupted = True
                break
        return RenderReport(
            frames=self.frames_emitted, chunks=self.engine.next_chunk, elapsed=time.perf_counter() - t0,
            chunk_seconds=chunk_seconds, prompt_chunks=prompt_chunks, outputs=[], warnings=[],
            interrupted=interrupted, memory_stats=self.policy.stats(),
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
        "memory": renderer.policy.stats(),
    }
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def render(storyboard, output: str | Path, *, lossless: str | Path | None = None, bundle: ModelBundle | None = None,
           device: str = "cpu", on_chunk: Callable[[ChunkEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None) -> RenderReport:
    """Render ``storyboard`` to ``output`` (.mp4, or .mkv for lossless FFV1) and optional extras."""
    from slotgen.video.writer import open_writer

    renderer = Renderer(storyboard, bundle=bundle, device=device)
    warnings = renderer.warnings()
    writers = [open_writer(output, storyboard.fps, renderer.size)]
    if lossless is not None:
        writers.append(open_writer(lossless, storyboard.fps, renderer.size))
    try:
        report = renderer.stream(writers, on_chunk=on_chunk, should_stop=should_stop)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    report.outputs = [str(w.close()) for w in writers]
    report.warnings = warnings
    if stats is not None:
        write_stats(stats, renderer, report)
    return report
