"""Continuing a story from a snapshot: the one composition behind ``slotgen resume`` and :func:`resume`.

:func:`prepare_resume` reads the snapshot, builds the combined timeline (:func:`continuation`: the
snapshot's storyboard plus new prompts whose times count from its end), checks an ``--append`` target
(:func:`append_source`), loads the model and positions a :class:`~slotgen.render.Renderer` where the
snapshot stopped (:func:`renderer_from_snapshot`). :meth:`Resumption.stream` renders the continuation
into files. The CLI and the library call these same two steps; only the progress bar differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slotgen.errors import SlotgenError, SnapshotError
from slotgen.models import ModelBundle, load_model
from slotgen.render import DEFAULT_SNAPSHOT_EVERY, ChunkEvent, Renderer, RenderReport, stream_to_files
from slotgen.snapshot import Snapshot, check_model, default_snapshot_path, load_snapshot
from slotgen.storyboard import PromptSpan

RESUME_FIXED_KEYS = {"seed": "the seed", "fps": "the frame rate", "resolution": "the resolution", "model": "the model",
                     "sampler": "the sampler", "memory": "the memory configuration"}
"""Storyboard keys a continuation inherits from the snapshot (a more.yaml may repeat, never change them),
with how messages name them."""


def extend_storyboard(base, more=None, *, prompt: str | None = None, duration: float | None = None):
    """The combined timeline: ``base`` (the snapshot's storyboard) followed by new prompts.

    New prompt times count from the END of ``base`` (``base.duration``): a ``more`` storyboard's
    ``at: 0`` is the first instant after the snapshot's storyboard. ``prompt``/``duration`` is a
    one-prompt ``more``. If the first new prompt has the same text as ``base``'s last one, the two
    spans merge (the prompt simply continues). ``more`` may repeat the keys in
    :data:`RESUME_FIXED_KEYS` with the same values; a different value is a StoryboardError on its line.
    ``more`` is a parsed storyboard or the path of one (str or Path).
    """
    if isinstance(more, (str, os.PathLike)):
        from slotgen.storyboard import load_storyboard

        more = load_storyboard(more)
    if more is None and prompt is None:
        return base
    if more is not None:
        for key in RESUME_FIXED_KEYS:
            if more.line_of(key) is None:
                continue
            mine, theirs = getattr(base, key), getattr(more, key)
            if key == "memory" and mine.preset is not None:  # the snapshot holds its memory resolved
                from slotgen.memory.registry import resolve_memory

                theirs = resolve_memory(theirs, mine.preset)
            if mine != theirs:
                shown = _show(key, mine)
                raise more.error_at(f"{_show(key, theirs)} differs from the snapshot's {shown}; a continuation keeps "
                                    f"the snapshot's {key} (remove the key or set it to {shown})", key)
        spans = [(p.start, p.end, p.text, p.transition, p.blend) for p in more.prompts]
        extra = more.duration
    else:
        if duration is None or not duration > 0:
            raise SlotgenError("--duration must be longer than 0s")
        spans = [(0.0, duration, prompt, 0.0, "linear")]
        extra = duration
    offset = base.duration
    shifted = [PromptSpan(start=offset + a, end=offset + b, text=t, transition=tr, blend=bl) for a, b, t, tr, bl in spans]
    prompts = list(base.prompts)
    if prompts[-1].text == shifted[0].text:
        last = prompts.pop()
        shifted[0] = last.model_copy(update={"end": shifted[0].end})
    return base.with_overrides(duration=offset + extra, prompts=prompts + shifted)


def _show(key: str, value: Any) -> str:
    if key == "resolution":
        return "default" if value is None else f"{value[0]}x{value[1]}"
    if hasattr(value, "model_dump"):
        return ", ".join(f"{k}={v}" for k, v in value.model_dump(exclude_none=True).items()) or "defaults"
    return repr(value)


def continuation(snapshot, *, storyboard=None, prompt: str | None = None, duration: float | None = None):
    """The combined timeline a resume renders: the snapshot's storyboard + new prompts (shifted).

    Times in ``storyboard`` (a more.yaml) and ``duration`` count from the END of the snapshot's
    storyboard. With neither, an unfinished snapshot (an interrupted render) continues its own
    storyboard; a finished one is an error.
    """
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


def renderer_from_snapshot(snapshot: Snapshot, storyboard=None, *, bundle: ModelBundle | None = None,
                           device: str = "cpu", model: str | None = None,
                           checkpoint: str | Path | None = None, slot_phi: str | Path | None = None) -> Renderer:
    """A renderer positioned where ``snapshot`` stopped, for ``storyboard`` (default: the snapshot's).

    ``storyboard`` must extend the snapshot's (see :func:`extend_storyboard`). The model is ``bundle``,
    else loaded from ``model`` or the snapshot's model spec (with ``checkpoint`` for a Wan2.1 folder);
    its weights digest must match the snapshot's.
    """
    sb = storyboard if storyboard is not None else snapshot.storyboard
    if bundle is None:
        from slotgen.preflight import check_device

        bundle = load_model(model or snapshot.model["spec"], device=check_device(device), checkpoint=checkpoint,
                            preset=snapshot.memory.preset)
    from slotgen.memory.phi_file import phi_for_snapshot

    bundle = phi_for_snapshot(bundle, snapshot.model.get("slot_phi"), slot_phi)  # the φ the render used
    check_model(snapshot, bundle)
    renderer = Renderer(sb, bundle=bundle)
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


@dataclass
class Resumption:
    """A continuation ready to render: the positioned renderer and where its frames go."""

    renderer: Renderer
    output: Path  # the continuation's video, or with ``original`` the joined one
    original: Path | None  # the video the continuation is appended to (``--append``), checked
    snapshot: Snapshot | None = None  # what it continues (its recorded lossless copy can be extended)
    original_first: int = 0  # the story frame ``original`` starts at

    def lossless_base(self, lossless: str | Path | None) -> tuple[Path | None, int | None]:
        """``--lossless`` naming the snapshot's own lossless copy extends it (never overwrites it):
        returns (that copy, the story frame it starts at), else (None, None)."""
        snap = self.snapshot
        if lossless is None or snap is None or not snap.video.get("lossless"):
            return None, None
        recorded = Path(snap.video["lossless"])
        if not _same_file(recorded, Path(lossless)):
            return None, None
        first = int(snap.video.get("lossless_first_frame", 0))
        if not recorded.is_file():
            raise SlotgenError(f"--lossless {str(lossless)!r} is the snapshot's lossless copy but it does not exist; "
                               f"name another file for the continuation alone")
        from slotgen.video.segments import count_frames

        have, want = count_frames(recorded), snap.frames_emitted - first
        if have != want:
            raise SlotgenError(f"--lossless {str(lossless)!r} has {have} frames but the snapshot's lossless copy should "
                               f"hold {want}; name another file for the continuation alone")
        return recorded, first

    def stream(self, *, lossless: str | Path | None = None, on_chunk: Callable[[ChunkEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None, stats: str | Path | None = None,
               snapshot_out: str | Path | None = None, snapshot_every=DEFAULT_SNAPSHOT_EVERY) -> RenderReport:
        """Render the continuation into :attr:`output` (joined to :attr:`original` when set), then write
        ``stats`` and ``snapshot_out`` (the end of the continuation, to extend the story again).

        ``lossless`` naming the snapshot's recorded lossless copy extends that copy; any other path gets
        the continuation alone. ``snapshot_every``: crash-safety snapshots, as for :func:`slotgen.render.render`."""
        renderer, output, original = self.renderer, self.output, self.original
        start = renderer.frames_emitted
        lossless_base, lossless_first = self.lossless_base(lossless)
        report = stream_to_files(renderer, output, lossless=lossless, on_chunk=on_chunk, should_stop=should_stop,
                                 stats=stats, snapshot=snapshot_out, snapshot_every=snapshot_every, base=original,
                                 video_first_frame=self.original_first if original is not None else start,
                                 lossless_base=lossless_base, lossless_first_frame=lossless_first)
        report.warnings = renderer.warnings()
        return report


def _same_file(a: Path, b: Path) -> bool:
    """Same resolved path, or the same inode (hard link, another spelling)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def prepare_resume(snapshot: Snapshot | str | Path, output: str | Path, *, storyboard=None, prompt: str | None = None,
                   duration: float | None = None, append: bool = False, append_to: str | Path | None = None,
                   bundle: ModelBundle | None = None, device: str = "cpu", model: str | None = None,
                   checkpoint: str | Path | None = None, slot_phi: str | Path | None = None) -> Resumption:
    """Read ``snapshot`` (a :class:`~slotgen.snapshot.Snapshot` or a path), complete the video joins a
    crash left due (:func:`~slotgen.video.segments.complete_joins`), combine the timeline
    (:func:`continuation`), check the ``append``/``append_to`` target (:func:`append_source`) and
    position a renderer (:func:`renderer_from_snapshot`). Every check runs before the model loads."""
    from slotgen.video.segments import complete_joins

    snap = snapshot if isinstance(snapshot, Snapshot) else load_snapshot(snapshot)
    complete_joins(snap.video.get("joins", []))
    combined = continuation(snap, storyboard=storyboard, prompt=prompt, duration=duration)
    original = append_source(snap, append, append_to, output)
    renderer = renderer_from_snapshot(snap, combined, bundle=bundle, device=device, model=model, checkpoint=checkpoint,
                                      slot_phi=slot_phi)
    first = int(snap.video.get("first_frame", 0)) if original is not None and append_to is None else 0
    return Resumption(renderer, Path(output), original, snap, first)


def resume(snapshot: Snapshot | str | Path, output: str | Path, *, storyboard=None, prompt: str | None = None,
           duration: float | None = None, lossless: str | Path | None = None, append: bool = False,
           append_to: str | Path | None = None, bundle: ModelBundle | None = None, device: str = "cpu",
           model: str | None = None, checkpoint: str | Path | None = None, slot_phi: str | Path | None = None,
           on_chunk: Callable[[ChunkEvent], None] | None = None, should_stop: Callable[[], bool] | None = None,
           stats: str | Path | None = None, snapshot_out: str | Path | None = None,
           snapshot_every=DEFAULT_SNAPSHOT_EVERY) -> RenderReport:
    """Continue ``snapshot`` into ``output``: :func:`prepare_resume` then :meth:`Resumption.stream`.

    ``storyboard``: more prompts, a parsed storyboard or the path of a YAML file (str or Path).

    ``output`` gets the continuation's frames only, or, with ``append``/``append_to``, a copy of the
    original video (``append_to``, else the video recorded in the snapshot) followed by the continuation
    (MP4 only; see :func:`~slotgen.video.writer.append_videos`). ``lossless`` is a lossless copy of the
    continuation alone. ``snapshot_out`` snapshots the end of the continuation, so a story can be
    extended again and again. The frames are bit-identical to rendering the combined timeline in one
    go (same device and dtype).
    """
    job = prepare_resume(snapshot, output, storyboard=storyboard, prompt=prompt, duration=duration, append=append,
                         append_to=append_to, bundle=bundle, device=device, model=model, checkpoint=checkpoint,
                         slot_phi=slot_phi)
    return job.stream(lossless=lossless, on_chunk=on_chunk, should_stop=should_stop, stats=stats,
                      snapshot_out=snapshot_out, snapshot_every=snapshot_every)


def append_source(snap, append: bool, append_to: str | Path | None, output: str | Path) -> Path | None:
    """The MP4 a resume with ``--append`` joins the continuation to (None: no append), checked up front.

    It must exist and hold exactly the snapshot's frames so far (else the join would repeat or skip some):
    ``append_to`` from the story's start, the recorded video from its recorded first frame (a continuation
    written alone is extended in place).
    """
    if not append and append_to is None:
        return None
    from slotgen.video.writer import probe_video

    output = Path(output)
    if output.suffix.lower() not in (".mp4", ".mkv"):
        raise SlotgenError(f"--append writes an MP4 (or a lossless .mkv); -o {str(output)!r} must end in .mp4 or .mkv")
    if append_to is not None:
        original = Path(append_to)
    else:
        recorded = snap.video.get("path")
        if recorded is None:
            raise SlotgenError("the snapshot records no video to append to; pass --append-to original.mp4")
        original = Path(recorded)
    if not original.is_file():
        raise SlotgenError(f"video to append to {str(original)!r} does not exist; pass --append-to original.mp4")
    if original.suffix.lower() != output.suffix.lower():
        raise SlotgenError(f"--append joins videos of one kind; {str(original)!r} is not a {output.suffix.lower()} "
                           f"like -o {str(output)!r}")
    try:
        frames = probe_video(original)["frames"]
    except SlotgenError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV errors on a broken file
        raise SlotgenError(f"cannot read video {str(original)!r}: {' '.join(str(e).split())[:120]}") from None
    first = 0 if append_to is not None else int(snap.video.get("first_frame", 0))
    if frames != snap.frames_emitted - first:
        raise SlotgenError(f"video {str(original)!r} has {frames} frames but the snapshot continues after frame "
                           f"{snap.frames_emitted} (the video should hold frames {first}..{snap.frames_emitted} of "
                           f"the story); pass --append-to with the video this snapshot was taken from")
    return original
