"""A live session: one render on a worker thread, directed while it runs, recorded as a storyboard.

:class:`LiveSession` streams an open-ended story with :func:`slotgen.render.stream_to_files`. After every
chunk (on the render thread, in ``on_chunk``) it decides the prompt of the next chunk: a prompt typed
since (:meth:`LiveSession.submit`), else the starting storyboard's schedule, else the prompt in force.
The decision is written into the renderer's storyboard at the next chunk's first frame time, so the
story so far is always a real :class:`~slotgen.storyboard.Storyboard` whose prompts start exactly where
they took effect. That storyboard is what the render runs, what snapshots hold and what ``story.yaml``
records: ``slotgen render story.yaml`` reproduces the live frames bit for bit.

A prompt typed while a chunk is being made retakes that chunk (:meth:`LiveSession._retake`, asked by
the engine before every transformer block until the chunk's commit pass, the re-cache passes included):
its decision is replaced, the engine restores its state and makes the chunk again, so the prompt takes
effect one chunk sooner and the record still says where. The first chunk under a typed prompt is
decoded a latent frame at a time and its first frame is sent before its commit pass.

The renderer's storyboard runs two chunks ahead of the chunk just generated (the next chunk, decided,
and one more under the same prompt), so the crash-safety checkpoints of ``stream_to_files`` fire and a
``kill -9`` leaves a snapshot that resumes. A stop cuts the storyboard at the chunk just generated: the
stream ends there and ``snapshot.pt`` is a finished snapshot that ``slotgen resume`` extends.

Frames go to :class:`~slotgen.live.broadcast.Broadcaster` as they are decoded (a writer beside the MP4
and the lossless copy); each viewer has a bounded queue, so no viewer can stall the render.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from slotgen.errors import SlotgenError
from slotgen.storyboard import PromptSpan, Storyboard

MAX_PROMPT_CHARS = 1000
"""Longest prompt the page may send (the text encoders read far fewer tokens than this)."""

MAX_TRANSITION = 60.0
"""Longest transition the page may ask for, in seconds."""

DEFAULT_PROMPT = "a red circle moves right on a blue background"
"""The first prompt of a session started without a storyboard."""

OUTPUT_NAMES = {"video": "live.mp4", "lossless": "live.mkv", "story": "story.yaml", "snapshot": "snapshot.pt"}


def check_prompt(text: object) -> str:
    """A prompt from the page, validated like storyboard text: a non-empty string of at most
    :data:`MAX_PROMPT_CHARS` characters with no control characters (line breaks included). Returns
    it stripped; raises :class:`SlotgenError` with one line otherwise."""
    if not isinstance(text, str):
        raise SlotgenError("prompt: expected text")
    if len(text) > MAX_PROMPT_CHARS:
        raise SlotgenError(f"prompt: at most {MAX_PROMPT_CHARS} characters, got {len(text)}")
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")), None)
    if bad is not None:
        raise SlotgenError(f"prompt: control character U+{ord(bad):04X} is not allowed")
    text = text.strip()
    if not text:
        raise SlotgenError("prompt: must not be empty")
    return text


def check_transition(seconds: object, blend: object) -> tuple[float, str]:
    """``(seconds, blend)`` from the page: 0 ≤ seconds ≤ :data:`MAX_TRANSITION`, blend linear|slerp."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_TRANSITION:
        raise SlotgenError(f"transition: expected seconds from 0 to {MAX_TRANSITION:g}, got {seconds!r}")
    if blend not in ("linear", "slerp"):
        raise SlotgenError(f"blend: expected linear or slerp, got {blend!r}")
    return float(seconds), str(blend)


@dataclass
class Entry:
    """A prompt of the live timeline: from ``start`` seconds (chunk-exact once it took effect)."""

    start: float
    text: str
    transition: float = 0.0
    blend: str = "linear"
    chunk: int | None = None  # the chunk it took effect at (None: scheduled, not yet in force)
    source: str = "storyboard"  # "storyboard" (scheduled) or "typed"
    submitted: float | None = None  # time.monotonic() when it was typed


@dataclass
class LiveState:
    """What the page shows (JSON)."""

    status: str  # "running" | "paused" | "stopping" | "stopped" | "failed"
    chunk: int  # chunks generated
    frames: int  # frames generated
    fps: int
    seconds: float
    current: str | None
    next: dict | None  # the typed prompt waiting to take effect
    timeline: list[dict]
    memory: dict | None
    snapshots: list[str] = field(default_factory=list)  # file names in the output folder
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


class LiveSession:
    """One live render (see the module docstring). ``storyboard``: the start (its prompts play as
    scheduled until one is typed); ``resume``: a snapshot to continue instead. ``out``: the folder for
    the MP4, the lossless copy, ``story.yaml`` and the snapshots. ``realtime``: never run ahead of
    the wall clock by more than a chunk (off: as fast as the machine allows)."""

    def __init__(self, storyboard: Storyboard | None = None, *, out: str | Path, bundle=None, device: str = "cpu",
                 resume: str | Path | None = None, realtime: bool = True, snapshot_every=30.0,
                 on_event: Callable[[str, dict], None] | None = None):
        from slotgen.live.broadcast import Broadcaster
        from slotgen.render import Renderer

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.realtime = realtime
        self.snapshot_every = snapshot_every
        self.on_event = on_event
        if resume is not None:
            from slotgen.resume import renderer_from_snapshot
            from slotgen.snapshot import load_snapshot

            snap = load_snapshot(resume)
            self.renderer = renderer_from_snapshot(snap, bundle=bundle, device=device)
            start = snap.storyboard
        else:
            if storyboard is None:
                storyboard = Storyboard(duration=3600.0, prompts=[PromptSpan(start=0, end=3600.0, text=DEFAULT_PROMPT)])
            self.renderer = Renderer(storyboard, bundle=bundle, device=device)
            start = self.renderer.storyboard
        self.base = self.renderer.storyboard  # settings (seed, model, memory resolved, ...) of every timeline
        self.fps = self.base.fps
        self.geometry = self.renderer.engine.geometry
        self.first_chunk = self.renderer.engine.next_chunk
        # the prompts in force so far (recorded) and the starting storyboard's schedule still to come
        self.entries: list[Entry] = []
        self.schedule: list[Entry] = []
        t_next = self._t(self.first_chunk)
        for p in start.prompts:
            e = Entry(p.start, p.text, p.transition, p.blend)
            if p.start <= t_next + 1e-9:
                e.chunk = next(c for c in range(self.first_chunk + 1) if self._t(c) >= p.start - 1e-9)
                self.entries.append(e)
            else:
                self.schedule.append(e)
        self.broadcast = Broadcaster(self.fps, first_frame=self.renderer.frames_emitted, chunk_of=self.chunk_of)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._typed: Entry | None = None
        self._paused = False
        self._stop = False
        self._snapshot_requests: list[threading.Event] = []
        self.snapshots: list[str] = []
        self.status = "running"
        self.error: str | None = None
        self.report = None
        self.chunks_done = self.first_chunk
        self.warnings = self.renderer.warnings()
        self._t0: float | None = None
        self._paused_for = 0.0
        self.thread: threading.Thread | None = None
        self.renderer.storyboard = self._timeline(self.first_chunk + 2)
        self.renderer.retake = self._retake
        self.renderer.show_first = self._typed_at
        self.memory_view = self._memory_view()

    # -- the timeline -------------------------------------------------------------------------------
    def chunk_of(self, frame: int) -> int:
        """The chunk that decoded video frame ``frame``."""
        c = max(0, (frame - self.geometry.video_frames(0)) // self.geometry.video_frames(1) + 1)
        while self.geometry.first_frame(c) > frame:
            c -= 1
        while self.geometry.first_frame(c + 1) <= frame:
            c += 1
        return c

    def _t(self, chunk: int) -> float:
        """Time (seconds) of ``chunk``'s first frame: where a prompt deciding that chunk starts."""
        return self.geometry.first_frame(chunk) / self.fps

    def _timeline(self, chunks: int) -> Storyboard:
        """The story of chunks ``0 .. chunks-1`` as a storyboard: the prompts decided so far, the last
        one running to the end of those chunks."""
        end = self.geometry.first_frame(chunks) / self.fps
        entries = [e for e in self.entries if e.start < end - 1e-9]
        spans = []
        for i, e in enumerate(entries):
            stop = entries[i + 1].start if i + 1 < len(entries) else end
            spans.append(PromptSpan(start=e.start, end=stop, text=e.text, transition=e.transition, blend=e.blend))
        return self.base.with_overrides(duration=end, prompts=spans)

    def record(self) -> Storyboard:
        """The storyboard of what was generated so far (every chunk, every prompt where it took effect)."""
        return self._timeline(self.chunks_done)

    def _decide(self, chunk: int) -> None:
        """Fix the prompt of ``chunk`` (about to be generated): a typed one, else the schedule's."""
        t = self._t(chunk)
        with self._lock:
            typed, self._typed = self._typed, None
        chosen: Entry | None = None
        if typed is not None:
            self.schedule.clear()  # typing takes over from the starting storyboard
            chosen = typed
        else:
            while self.schedule and self.schedule[0].start <= t + 1e-9:
                chosen = self.schedule.pop(0)
        if chosen is None or chosen.text == self.entries[-1].text:
            return
        chosen.start, chosen.chunk = t, chunk
        self.entries.append(chosen)
        self._event("prompt", {"chunk": chunk, "start": t, "text": chosen.text})

    def _retake(self, chunk: int) -> bool:
        """Asked on the render thread before ``chunk`` starts and before every transformer block until its
        commit pass, while nothing of it is committed: a prompt typed since it was decided takes effect at ``chunk``
        itself. The decision for ``chunk`` is replaced by the typed prompt (or withdrawn, when the
        typed prompt is the one in force before it) and True is returned: the engine restores its state
        and samples the chunk again under the new timeline, which is what the record then holds. The
        session's first chunk stays as started; a typed prompt already in force waits for
        :meth:`_decide` (which ignores it)."""
        if self._typed is None or chunk <= self.first_chunk:  # the common case, without the lock
            return False
        with self._lock:
            typed = self._typed
            if typed is None or self._stop or typed.text == self.entries[-1].text:
                return False
            self._typed = None
        kept = [e for e in self.entries if e.chunk is not None and e.chunk < chunk]
        self.schedule.clear()  # typing takes over from the starting storyboard
        if typed.text != kept[-1].text:
            typed.start, typed.chunk = self._t(chunk), chunk
            kept.append(typed)
        self.entries = kept
        self.renderer.storyboard = self._timeline(chunk + 2)  # the retaken chunk and one more
        self._event("prompt", {"chunk": chunk, "start": self._t(chunk), "text": kept[-1].text})
        return True

    def _typed_at(self, chunk: int) -> bool:
        """Whether a typed prompt takes effect at ``chunk`` (render thread): its first frame is decoded and
        sent before the chunk's commit pass (``Renderer.show_first``), as the latency is to that frame."""
        return any(e.chunk == chunk and e.source == "typed" for e in reversed(self.entries[-2:]))

    # -- control (any thread) -------------------------------------------------------------------------
    def submit(self, text: object, transition: object = 0.0, blend: object = "linear") -> dict:
        """Queue the next prompt: it takes effect at the chunk being sampled, or at the next one when that
        chunk is already committing (:meth:`_retake`). Returns the vocabulary
        warnings (words the model does not know are ignored by it)."""
        text = check_prompt(text)
        seconds, blend = check_transition(transition, blend)
        if self.status in ("stopping", "stopped", "failed"):
            raise SlotgenError("the session has stopped; start a new one")
        entry = Entry(0.0, text, seconds if self.entries else 0.0, blend if seconds > 0 else "linear",
                      source="typed", submitted=time.monotonic())
        with self._lock:
            self._typed = entry
            self._wake.notify_all()
        unknown = self.renderer.engine.text.unknown_words(text)
        warnings = [f"the model does not know the words {', '.join(map(repr, unknown))}; they are ignored"] if unknown else []
        return {"accepted": text, "transition": entry.transition, "blend": entry.blend, "warnings": warnings}

    def pause(self) -> None:
        with self._lock:
            self._paused = True
            if self.status == "running":
                self.status = "paused"

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            if self.status == "paused":
                self.status = "running"
            self._wake.notify_all()

    def stop(self) -> None:
        """Stop after the chunk being generated; the files are complete when :meth:`wait` returns."""
        with self._lock:
            self._stop = True
            if self.status in ("running", "paused"):
                self.status = "stopping"
            self._wake.notify_all()

    def snapshot(self, timeout: float | None = 120.0) -> str:
        """Write a snapshot of the story so far at the next chunk boundary; returns its file name (in
        the output folder). Raises :class:`SlotgenError` when the session is not running."""
        done = threading.Event()
        with self._lock:
            if self.status not in ("running", "paused"):
                raise SlotgenError(f"no snapshot: the session is {self.status}")
            self._snapshot_requests.append(done)
            self._wake.notify_all()
        if not done.wait(timeout):
            raise SlotgenError("no snapshot: the render did not reach a chunk boundary in time")
        if not getattr(done, "name", None):
            raise SlotgenError(f"no snapshot: {getattr(done, 'error', 'the session stopped first')}")
        return done.name

    def state(self) -> LiveState:
        with self._lock:
            typed = None if self._typed is None else {"text": self._typed.text, "transition": self._typed.transition,
                                                      "blend": self._typed.blend}
            status = self.status
        timeline = [{**{k: v for k, v in asdict(e).items() if k != "submitted"},
                     "frame": self.geometry.first_frame(e.chunk or 0)} for e in self.entries]
        frames = self.geometry.first_frame(self.chunks_done)
        return LiveState(status=status, chunk=self.chunks_done, frames=frames, fps=self.fps,
                         seconds=frames / self.fps, current=self.entries[-1].text if self.entries else None,
                         next=typed, timeline=timeline, memory=self.memory_view, snapshots=list(self.snapshots),
                         error=self.error, warnings=list(self.warnings))

    # -- the render thread ------------------------------------------------------------------------------
    def start(self) -> "LiveSession":
        self.thread = threading.Thread(target=self._run, name="slotgen-live-render", daemon=True)
        self.thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the render thread (after :meth:`stop`); True when it has finished."""
        if self.thread is None:
            return True
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def paths(self) -> dict[str, Path]:
        return {k: self.out / v for k, v in OUTPUT_NAMES.items()}

    def _run(self) -> None:
        from slotgen.atomic import atomic_write_bytes
        from slotgen.render import stream_to_files

        p = self.paths()
        self._t0 = time.monotonic()
        try:
            self.report = stream_to_files(self.renderer, p["video"], lossless=p["lossless"], on_chunk=self._on_chunk,
                                          snapshot=p["snapshot"], snapshot_every=self.snapshot_every,
                                          taps=[self.broadcast])
            atomic_write_bytes(p["story"], self.record().to_yaml().encode())
            self.status = "stopped"
        except BaseException as e:  # noqa: BLE001 - reported to the page and the terminal as one line
            from slotgen.errors import one_line

            self.error = one_line(e, 200) if not isinstance(e, SlotgenError) else str(e)
            self.status = "failed"
            try:  # what was recorded by the last checkpoint stays resumable; keep the record beside it
                atomic_write_bytes(p["story"], self.record().to_yaml().encode())
            except Exception:  # noqa: BLE001
                pass
        finally:
            with self._lock:
                for req in self._snapshot_requests:
                    req.error = "the session stopped first"
                    req.set()
                self._snapshot_requests.clear()
            self.memory_view = self._memory_view()
            self._event("state", {})
            self.broadcast.close()

    def _on_chunk(self, ev) -> None:
        """After chunk ``ev.chunk`` is generated (render thread): pace, pause, snapshot, stop or decide
        the next chunk's prompt."""
        self.chunks_done = ev.chunk + 1
        nxt = ev.chunk + 1
        self.memory_view = self._memory_view()
        if self.realtime:
            self._pace(nxt)
        with self._lock:
            while self._paused and not self._stop and not self._snapshot_requests:
                t = time.monotonic()
                self._wake.wait(0.5)
                self._paused_for += time.monotonic() - t
            requests, self._snapshot_requests = self._snapshot_requests, []
            stop = self._stop
        if requests:
            self._write_snapshot(requests, nxt)
            if not stop:
                with self._lock:  # a snapshot taken while paused stays paused
                    while self._paused and not self._stop:
                        t = time.monotonic()
                        self._wake.wait(0.5)
                        self._paused_for += time.monotonic() - t
                    stop = self._stop
        if stop:
            self.renderer.storyboard = self.record()  # ends the stream after this chunk
        else:
            self._decide(nxt)
            self.renderer.storyboard = self._timeline(nxt + 2)  # the decided chunk and one more
        self._event("chunk", {"chunk": ev.chunk})

    def _pace(self, nxt: int) -> None:
        """Real time: do not start a chunk more than one chunk's duration ahead of the wall clock."""
        ahead = self.geometry.first_frame(nxt) / self.fps - (time.monotonic() - self._t0 - self._paused_for)
        lead = self.geometry.video_frames(1) / self.fps
        with self._lock:  # a prompt typed (or a stop) ends the wait: the next chunk starts at once
            if ahead > lead:
                self._wake.wait_for(lambda: self._stop or self._typed is not None, ahead - lead)

    def _write_snapshot(self, requests: list[threading.Event], nxt: int) -> None:
        """A finished snapshot of the story through the chunk just generated (the frames so far)."""
        r = self.renderer
        r.drain()
        keep = r.storyboard
        name = f"snapshot-{self.geometry.first_frame(nxt):06d}.pt"
        try:
            r.storyboard = self.record()
            r.save_snapshot(self.out / name)
            self.snapshots.append(name)
            for req in requests:
                req.name = name
        except SlotgenError as e:
            for req in requests:
                req.error = str(e)
        finally:
            r.storyboard = keep
            for req in requests:
                req.set()

    def _memory_view(self) -> dict:
        """Per-layer memory numbers: the rows ``slotgen inspect`` prints, from the policy's stats()."""
        from slotgen.inspect import build_report
        from slotgen.memory.registry import policy_class

        report = build_report(self.renderer.policy.stats(), "live")
        columns = policy_class(report["policy"]).inspect_columns
        rows = []
        for row in report["layers"]:
            reported = len(row) > 2
            rows.append([str(row["layer"]), str(row["tokens"]),
                         *(str(cell(row)) if reported else "-" for _, cell in columns)])
        return {"policy": report["policy"], "frames_seen": report["frames_seen"], "bytes": report["bytes"],
                "columns": ["layer", "tokens", *(title for title, _ in columns)], "rows": rows,
                "layers": report["layers"]}

    def _event(self, kind: str, data: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, data)
            except Exception:  # noqa: BLE001 - a viewer problem never reaches the render
                pass
