"""Render a storyboard: storyboard → engine → memory → decoder → writers. The CLI is a thin layer on this.

:class:`Renderer` binds a validated storyboard to a model bundle and a memory policy, and streams the
video: every chunk's frames go straight to the writers (MP4 and, optionally, a lossless FFV1 copy), so
memory stays bounded however long the video is. Frames a chunk decodes past the storyboard's end are
kept as ``pending`` (a continuation emits them first, so render(A then B) == render(A) + resume(B)).

:func:`render` (and :func:`slotgen.resume.resume`) add files on top: the writers, an optional ``--stats``
JSON and a snapshot (:meth:`Renderer.snapshot_payload`, written in the :mod:`slotgen.snapshot` format).
Both take ``should_stop`` (polled after every chunk): a stop finishes the current chunk, closes playable
videos with every frame so far and writes a snapshot (``<output>.snapshot.pt`` unless one was asked for).
:class:`InterruptGuard` turns SIGINT/SIGTERM/SIGHUP into such a stop for the duration of a render.
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
from slotgen.errors import SlotgenError
from slotgen.engine.generator import ChunkResult, EngineOptions, StreamingEngine
from slotgen.engine.overlap import DecodeWorker
from slotgen.memory.registry import resolve_memory
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


def tokens_per_frame(bundle) -> int:
    """The model's transformer tokens per latent frame at its own resolution (``ModelSettings.resolution``):
    16 for the miniature, 1560 for Wan2.1 at 832×480. Slot sizes are relative to it, whatever resolution
    a storyboard asks for, so a model's memory behaves the same at every size it renders."""
    width, height = bundle.settings.resolution
    return (width // bundle.stride) * (height // bundle.stride)


def resolved_storyboard(storyboard, model_preset: str | None, tokens_per_frame: int | None = None):
    """``storyboard`` with its memory section resolved under ``model_preset`` (the preset fixed, its keys
    filled in) and, given ``tokens_per_frame``, the keys it leaves to the model's geometry
    (``PolicyConfig.for_frame``): the storyboard a render actually runs, and the one its snapshots hold."""
    memory = resolve_memory(storyboard.memory, model_preset)
    if tokens_per_frame is not None:
        try:
            memory = memory.for_frame(tokens_per_frame)
        except ValueError as err:  # pydantic's ValidationError included
            raise SlotgenError(f"memory: {' '.join(str(err).split())}") from None
    if memory != storyboard.memory or memory.model_fields_set != storyboard.memory.model_fields_set:
        return storyboard.with_overrides(memory=memory)
    return storyboard


class Renderer:
    """A storyboard bound to a model and a memory policy; renders (and continues) its timeline."""

    def __init__(self, storyboard, bundle: ModelBundle | None = None, device: str = "cpu", compile: bool = False,
                 overlap: bool = True, slot_phi: str | Path | None = None):
        from slotgen.memory.phi_file import attach_phi
        from slotgen.preflight import check_device, check_memory

        if bundle is None:
            bundle = load_model(storyboard.model, device=check_device(device), preset=storyboard.memory.preset)
        bundle = attach_phi(bundle, slot_phi)  # --slot-phi FILE (or training-free) instead of the model's own
        self.bundle = bundle
        self.storyboard = storyboard
        s = self.bundle.settings
        width, height = storyboard.check_resolution(self.bundle.stride, s.resolution)
        self.preflight = check_memory(self.bundle, width, height)  # refuses what cannot fit; None or a warning
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
        storyboard = self.storyboard = resolved_storyboard(storyboard, s.preset, tokens_per_frame(self.bundle))
        memory = storyboard.memory
        self.options.preset = memory.preset
        self.policy = build_policy(memory, len(self.bundle.transformer.blocks), phi=self.bundle.slot_phi)
        if hasattr(self.policy, "phi_info"):  # the slot policy records which φ it groups with (inspect shows it)
            from slotgen.memory.phi_file import phi_record

            self.policy.phi_info = phi_record(self.bundle)
        self.engine = StreamingEngine(self.bundle, self.policy, self.options)
        self.frames_emitted = 0  # video frames handed to the writers so far
        self.pending = np.zeros((0, height, width, 3), np.uint8)  # decoded past the timeline's end
        self.source: str | None = None  # the story's first storyboard file, kept across resumes
        self.notes: list[str] = []  # warnings raised while rendering (a snapshot written elsewhere, ...)
        self.overlap = overlap  # decode + write on a worker thread while the next chunk generates
        self._worker: DecodeWorker | None = None  # the running stream's worker (see drain)
        # retake(chunk) -> bool: asked while a chunk is made (before every block until its commit pass); True
        # makes it again from the current storyboard (a live session's typed prompt; StreamingEngine.generate_chunk)
        self.retake: Callable[[int], bool] | None = None
        # show_first(chunk) -> bool: with overlap, that chunk is decoded one latent frame at a time and its
        # first frames are handed to the writers before its commit pass starts (a live session: the first
        # chunk under a typed prompt); frames are unchanged, only the order of the work moves
        self.show_first: Callable[[int], bool] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.options.width, self.options.height

    def warnings(self) -> list[str]:
        out = [self.preflight] if self.preflight else []
        for p in self.storyboard.prompts:
            unknown = self.engine.text.unknown_words(p.text)
            if unknown:
                out.append(f"the model '{self.bundle.name}' does not know the words {', '.join(map(repr, unknown))} "
                           f"in prompt {p.text!r}; they are ignored")
        return out

    def memory_line(self) -> str | None:
        """The slot memory's resolved sizes and its φ, for the render's first lines (None for other policies)."""
        m = self.storyboard.memory
        if m.policy != "slot":
            return None
        from slotgen.memory.phi_file import describe, phi_record

        tpf = tokens_per_frame(self.bundle)
        return (f"slot memory: {m.num_slots} slots, top_r {m.top_r} tokens per item, top_k {m.top_k} items read, "
                f"budget {m.budget} tokens per layer ({m.budget / tpf:.3g} frames of the model's {tpf} tokens); "
                f"φ {describe(phi_record(self.bundle))}")

    def total_chunks(self) -> int:
        return self.engine.geometry.num_chunks(self.storyboard.total_frames)

    def stream(self, writers: list, on_chunk: Callable[[ChunkEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> RenderReport:
        """Generate the rest of the timeline, writing frames to every writer as each chunk is decoded.

        ``should_stop`` is polled after every chunk (an interrupt finishes the current chunk first).
        ``on_chunk`` may replace :attr:`storyboard` by one that extends it (a live session does): the
        stream follows the current one.
        """
        start = self.frames_emitted
        total, total_chunks = -1, 0
        t0 = time.perf_counter()
        chunk_seconds: list[float] = []
        prompt_chunks: list[int] = []
        interrupted = False

        def emit(frames: np.ndarray) -> None:
            take = max(0, min(len(frames), self.storyboard.total_frames - self.frames_emitted))
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
        # The worker gets each chunk's latents as soon as they are final, before the commit pass.
        decoder, show_first = self.engine.decoder, self.show_first
        worker = DecodeWorker(decoder.decode_chunk, lambda chunk, frames: emit(frames), depth=1,
                              device=self.bundle.device, pieces=decoder.decode_frames) if self.overlap else None
        self._worker = worker

        def on_sampled(chunk: int, latents: torch.Tensor) -> None:  # blocks while the previous chunk is written
            worker.put(chunk, latents, wait_first=show_first is not None and show_first(chunk))

        last = t0
        try:
            res: ChunkResult
            for res in self.engine.run(lambda: self.storyboard, decode=worker is None, retake=self.retake,
                                       on_sampled=on_sampled if worker is not None else None):
                if worker is None:
                    emit(res.frames)
                now = time.perf_counter()
                seconds, last = now - last, now  # the stream's period, chunk to chunk
                chunk_seconds.append(seconds)
                prompt_chunks.append(res.prompt_index)
                if self.storyboard.total_frames != total:  # the first chunk, or a live session extended it
                    total, total_chunks = self.storyboard.total_frames, self.total_chunks()
                done = min(total, self.engine.geometry.first_frame(self.engine.next_chunk))
                if on_chunk is not None:
                    on_chunk(ChunkEvent(res.chunk, total_chunks, res.prompt_index, res.prompt, done, total,
                                        self.storyboard.fps, seconds, now - t0, res.recached_frames))
                if should_stop is not None and should_stop() and done < self.storyboard.total_frames:
                    interrupted = True
                    break
        finally:
            self._worker = None
            if worker is not None:
                worker.close()  # every generated chunk decoded and written: the state is as without overlap
        return RenderReport(
            frames=self.frames_emitted - start, chunks=self.engine.next_chunk, elapsed=time.perf_counter() - t0,
            chunk_seconds=chunk_seconds, prompt_chunks=prompt_chunks, outputs=[], warnings=[],
            interrupted=interrupted, memory_stats=self.policy.stats(), first_frame=start,
            total_frames=self.storyboard.total_frames,
        )

    def drain(self) -> None:
        """Wait until every chunk generated so far is decoded and handed to the writers (a no-op outside
        an overlapped stream). An ``on_chunk`` callback calls it before it reads :attr:`frames_emitted`
        or the writers, or takes a snapshot: then the writers, ``frames_emitted``, ``pending``, the
        decoder and the engine agree exactly as with inline decoding."""
        if self._worker is not None:
            self._worker.drain()

    # -- snapshots ----------------------------------------------------------------------------------
    def _model_info(self) -> dict:
        from slotgen.memory.phi_file import phi_record
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
            "slot_phi": phi_record(bundle),
            "transformer": transformer,
            "dtype": str(bundle.dtype).replace("torch.", ""),
            "device": str(bundle.device),
        }

    def snapshot_payload(self, *, video: str | Path | None = None, video_first_frame: int = 0,
                         lossless: str | Path | None = None, lossless_first_frame: int = 0,
                         interrupted: bool = False, joins: list[dict] | None = None) -> dict:
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
                "joins": list(joins or []),  # sealed segments not yet joined onto their video (crash safety)
            },
        }

    def save_snapshot(self, path: str | Path, **video) -> Path:
        """Write :meth:`snapshot_payload` (``video``: its keyword arguments) to ``path`` atomically.

        The state is never lost to a write error: when ``path`` cannot be written (disk full, read-only)
        the snapshot goes to the temporary directory, then the home directory; the path used is returned
        and a warning saying why is added to :attr:`notes`. Raises :class:`WriteError` when none works."""
        from slotgen.errors import WriteError, write_cause

        path = Path(path)
        payload = self.snapshot_payload(**video)
        try:
            return write_snapshot(path, payload)
        except OSError as e:
            first = write_cause(e, "", str(path.parent))
        import tempfile

        tried = []
        for d in (Path(tempfile.gettempdir()), Path.home()):
            alt = d / path.name
            if alt.resolve() == path.resolve():
                continue
            try:
                written = write_snapshot(alt, payload)
            except (OSError, SlotgenError) as e:
                tried.append(f"{d}: {write_cause(e, '', str(d))}")
                continue
            self.notes.append(f"cannot write snapshot {str(path)!r}: {first}; it was written to {str(written)!r}")
            return written
        raise WriteError(f"cannot write snapshot {str(path)!r}: {first}; nor to {'; '.join(tried) or 'any fallback'}")


def write_stats(path: str | Path, renderer: Renderer, report: RenderReport,
                video: tuple[str | Path, int] | None = None) -> None:
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
        "video": None if video is None else str(Path(video[0]).resolve()),  # what `inspect --png` draws under
        "video_first_frame": 0 if video is None else int(video[1]),
        "stride_t": int(renderer.bundle.settings.vae_stride_t),
    }
    from slotgen.errors import WriteError, write_cause

    try:
        atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    except OSError as e:
        raise WriteError(f"cannot write --stats {str(path)!r}: {write_cause(e, '', str(Path(path).parent))}") from None


def _detach_from_closed_terminal() -> None:
    """After SIGHUP (the terminal closed) stdout/stderr that were that terminal point at /dev/null, so the
    messages printed while saving cannot fail with EIO and cut the save short."""
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        except OSError:
            pass


class InterruptGuard:
    """SIGINT/SIGTERM/SIGHUP (a closed terminal) → "stop after the current chunk", installed only inside a
    ``with`` block.

    Use the guard itself as ``should_stop``. The first signal sets :attr:`signum` (and calls
    ``on_signal``); a second one raises :class:`KeyboardInterrupt` (abort without saving). The previous
    handlers are restored on exit. Outside the main thread it installs nothing (signals cannot be caught
    there) and never stops.
    """

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            _detach_from_closed_terminal()
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.on_signal is not None:
            try:
                self.on_signal(signum)
            except OSError:  # the terminal is gone: the stop goes on without its notice
                pass

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
    """With ``SLOTGEN_DEBUG_CHUNKS=1``: one machine-readable line per finished chunk on stderr (before
    that chunk's crash-safety checkpoint). With ``SLOTGEN_DEBUG_HOLD_AFTER_CHUNK=K`` as well, the render
    then waits for a line on stdin after chunk ``K``'s line: a test that kills the process at an
    earlier chunk knows the render cannot have finished, however slowly its own reading is scheduled."""
    if os.environ.get("SLOTGEN_DEBUG_CHUNKS") == "1":
        print(f"slotgen-chunk {ev.chunk} frames {ev.frames_done} of {ev.total_frames}", file=sys.stderr, flush=True)
        hold = os.environ.get("SLOTGEN_DEBUG_HOLD_AFTER_CHUNK")
        if hold is not None and ev.chunk == int(hold):
            sys.stdin.readline()


def _chain(*callbacks):
    callbacks = [c for c in callbacks if c is not None]

    def on_chunk(ev: ChunkEvent) -> None:
        for c in callbacks:
            c(ev)

    return on_chunk


DEFAULT_SNAPSHOT_EVERY = 300.0
"""Seconds of wall time between crash-safety snapshots unless told otherwise (renders shorter than
this never pay for one)."""


@dataclass(frozen=True)
class SnapshotEvery:
    """When a render makes itself durable: every ``seconds`` of wall time and/or every ``chunks`` chunks."""

    seconds: float | None = None
    chunks: int | None = None

    @classmethod
    def parse(cls, value: "SnapshotEvery | float | int | str | None") -> "SnapshotEvery":
        """``300`` / ``"300"`` / ``"5m"``: seconds; ``"4c"``/``"4chunks"``: chunks; ``0``/``None``/``"off"``: never."""
        from slotgen.errors import SlotgenError
        from slotgen.timeparse import parse_time

        if isinstance(value, SnapshotEvery):
            return value
        if value is None or value == 0 or (isinstance(value, str) and value.strip().lower() in ("0", "off", "never")):
            return cls()
        if isinstance(value, bool):
            raise SlotgenError(f"--snapshot-every: expected seconds (300, 5m) or chunks (4c), got {value!r}")
        if isinstance(value, (int, float)):
            if not value > 0 or value != value or value == float("inf"):
                raise SlotgenError(f"--snapshot-every: expected a positive number of seconds, got {value!r}")
            return cls(seconds=float(value))
        text = str(value).strip().lower()
        for tail in ("chunks", "chunk", "c"):
            if text.endswith(tail) and text[: -len(tail)].strip().isdigit():
                n = int(text[: -len(tail)])
                if n < 1:
                    raise SlotgenError(f"--snapshot-every: at least 1 chunk, got {value!r}")
                return cls(chunks=n)
        try:
            seconds = parse_time(text)
        except ValueError:
            raise SlotgenError(f"--snapshot-every: expected seconds (300, 5m), chunks (4c) or 0 (off), got {value!r}") from None
        return cls(seconds=seconds) if seconds > 0 else cls()

    @property
    def enabled(self) -> bool:
        return self.seconds is not None or self.chunks is not None


def stream_to_files(renderer: Renderer, output: str | Path, *, lossless: str | Path | None = None,
                    on_chunk: Callable[[ChunkEvent], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
                    snapshot: str | Path | None = None, snapshot_every=DEFAULT_SNAPSHOT_EVERY,
                    base: str | Path | None = None, lossless_base: str | Path | None = None,
                    video_first_frame: int | None = None, lossless_first_frame: int | None = None,
                    taps: list = ()) -> RenderReport:
    """Stream the rest of ``renderer``'s timeline into ``output`` (+ ``lossless``), then stats and snapshot.

    ``taps``: more writers (``write(frames)``) that see every frame as it is decoded (a live page).

    ``base``/``lossless_base``: videos already holding the frames before this run (``resume --append``);
    the outputs become base + the new frames (``output`` may be ``base``). ``video_first_frame`` /
    ``lossless_first_frame``: the story frame each output starts at (default: 0 with a base, else
    where this run starts).

    Crash safety (``snapshot_every``, see :class:`SnapshotEvery` and docs/SNAPSHOTS.md): every interval
    the videos' segments are sealed, a snapshot recording the due joins is written atomically to
    ``snapshot`` (default ``<output>.snapshot.pt``), and the segments are joined onto the outputs. After a
    ``kill -9`` the newest snapshot resumes bit-exactly and the outputs hold (or, through the snapshot's
    join records, can be completed to) every frame it covers.

    On an exception the unsealed segments are dropped (the outputs keep what was joined). When
    ``should_stop`` stops the render the videos are closed (playable, every frame so far) and a
    snapshot is written to ``snapshot`` or, if none was asked for, ``<output>.snapshot.pt``.
    """
    from slotgen.video.segments import SegmentedOutput, remove_stale

    every = SnapshotEvery.parse(snapshot_every)
    fps = renderer.storyboard.fps
    start = renderer.frames_emitted
    first = {"video": (0 if base is not None else start) if video_first_frame is None else video_first_frame,
             "lossless": (0 if lossless_base is not None else start) if lossless_first_frame is None
             else lossless_first_frame}
    snap_target = Path(snapshot) if snapshot is not None else default_snapshot_path(output)
    for p in (output, lossless, snap_target):
        if p is not None:
            remove_stale(p)
    outs = [SegmentedOutput(output, fps, renderer.size, base=base)]
    try:
        if lossless is not None:
            outs.append(SegmentedOutput(lossless, fps, renderer.size, base=lossless_base))
    except BaseException:
        outs[0].abort()
        raise
    record = {"video": output, "video_first_frame": first["video"], "lossless": lossless,
              "lossless_first_frame": first["lossless"]}

    def checkpoint(interrupted: bool, go_on: bool = False) -> Path:
        """Seal the segments, write the snapshot (with the joins due), then join; ``go_on``: the render
        continues, so open the next segments here, on the render's thread (see SegmentedOutput.prepare)."""
        renderer.drain()  # overlapped decode: the chunks generated so far are written before anything is sealed
        joins = []
        for out, key in zip(outs, ("video", "lossless")):
            j = out.seal()
            if j is not None:
                j["frames"] = renderer.frames_emitted - first[key]
                joins.append(j)
        path = renderer.save_snapshot(snap_target, interrupted=interrupted, joins=joins, **record)
        for out in outs:
            out.recorded = out.sealed
        for out in outs:
            out.join()
            if go_on:
                out.prepare()
        return path

    state = {"t": time.monotonic(), "chunks": 0, "snapshots": 0}

    def maybe_checkpoint(ev: ChunkEvent) -> None:
        state["chunks"] += 1
        if not every.enabled or ev.frames_done >= ev.total_frames:  # generated (maybe not yet written) frames
            return
        due = (every.chunks is not None and state["chunks"] >= every.chunks) or \
              (every.seconds is not None and time.monotonic() - state["t"] >= every.seconds)
        if due:
            checkpoint(interrupted=False, go_on=True)
            state.update(t=time.monotonic(), chunks=0, snapshots=state["snapshots"] + 1)

    try:
        report = renderer.stream(outs + list(taps), on_chunk=_chain(on_chunk, debug_chunk_line, maybe_checkpoint),
                                 should_stop=should_stop)
        if report.interrupted or snapshot is not None or state["snapshots"]:
            # a crash-safety snapshot is brought up to the end too: the snapshot beside a video matches it
            report.snapshot = str(checkpoint(report.interrupted))
        else:
            for out in outs:
                out.close()
    except BaseException as e:
        for out in outs:
            out.abort()
        from slotgen.errors import WriteError

        if isinstance(e, WriteError) and state["snapshots"]:
            raise WriteError(f"{e}; the snapshot {str(snap_target)!r} of the last checkpoint is intact: resume it "
                             f"once the problem is fixed", e.path, e.cause) from None
        raise
    report.outputs = [str(out.target) for out in outs]
    if stats is not None:
        shown = (lossless, first["lossless"]) if lossless is not None else (output, first["video"])
        write_stats(stats, renderer, report, video=shown)
        report.outputs.append(str(stats))
    return report


def render(storyboard, output: str | Path, *, lossless: str | Path | None = None, bundle: ModelBundle | None = None,
           device: str = "cpu", on_chunk: Callable[[ChunkEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
           snapshot: str | Path | None = None, snapshot_every=DEFAULT_SNAPSHOT_EVERY) -> RenderReport:
    """Render ``storyboard`` to ``output`` (.mp4, or .mkv for lossless FFV1) and optional extras.

    ``snapshot``: also write a snapshot at the end, for :func:`resume`. An interrupted render (see
    ``should_stop``) always writes one (``<output>.snapshot.pt`` by default). ``snapshot_every``
    (seconds, ``"4c"`` for chunks, ``None``/0 for never; default 300 s) makes the render crash-safe:
    see :func:`stream_to_files`.
    """
    renderer = Renderer(storyboard, bundle=bundle, device=device)
    report = stream_to_files(renderer, output, lossless=lossless, on_chunk=on_chunk, should_stop=should_stop,
                             stats=stats, snapshot=snapshot, snapshot_every=snapshot_every)
    report.warnings = renderer.warnings()
    return report
