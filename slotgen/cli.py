"""The ``slotgen`` command line: a thin typer layer over the library (``slotgen.render`` and friends).

Every user mistake is a :class:`~slotgen.errors.SlotgenError`: printed as one line on stderr, exit
code 2, no traceback.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from slotgen.atomic import atomic_write_bytes
from slotgen.errors import SlotgenError

app = typer.Typer(
    name="slotgen",
    help="Long, consistent, story-driven video generation with a causal Wan2.1 transformer and slot memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (commands, not tests; results in docs/BENCHMARKS.md): speed, syncs, flops, "
                             "policy-cost, snapshot-sizes, identity and narrative.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

err_console = Console(stderr=True, highlight=False)


def user_errors(fn):
    """Turn SlotgenError into `error: <message>` + exit 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from slotgen.memory.registry import policy_names

            policy_names()  # a plug-in module that fails to import is reported here, as one line
            return fn(*args, **kwargs)
        except SlotgenError as e:
            _print_error(str(e))
            raise typer.Exit(e.exit_code)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except MemoryError:
            _print_error("out of memory: choose a smaller resolution, a smaller memory (--window, --slots) or "
                         "another --device")
            raise typer.Exit(2)
        except OSError as e:  # a write or read the library did not name: the path and the cause
            from slotgen.errors import write_cause

            where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
            _print_error(f"cannot access{where}: {write_cause(e)}")
            raise typer.Exit(2)
        except Exception as e:  # noqa: BLE001 - the last net: one line, exit 2, SLOTGEN_DEBUG=1 for the traceback
            if os.environ.get("SLOTGEN_DEBUG") == "1":
                raise
            from slotgen.errors import one_line

            _print_error(f"internal error ({type(e).__name__}: {one_line(e, 160)}); please report it "
                         f"(SLOTGEN_DEBUG=1 shows the traceback)")
            raise typer.Exit(2)

    return wrapper


def _print_error(message: str) -> None:
    message = " ".join(message.split())  # one line, always
    if err_console.is_terminal:
        err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=False, highlight=False)
    else:
        print(f"error: {message}", file=sys.stderr)


# -- memory options: one flag per key of every registered policy's config ------------------------------
@dataclass(frozen=True)
class MemoryOption:
    """A ``slotgen render`` flag that sets one memory key (for every policy that has the key)."""

    key: str  # the config field, e.g. num_slots
    flag: str  # the flag without dashes, e.g. slots
    type: type
    help: str
    policies: tuple[str, ...]


def memory_options() -> list[MemoryOption]:
    """The memory flags, derived from the registered policies' configs (first declaration wins the help).

    When a plug-in module fails to import, the flags of the policies registered so far are offered;
    the command itself then reports the failure (see :func:`user_errors`)."""
    from slotgen.memory.registry import config_classes, registered_configs

    try:
        configs = config_classes()
    except SlotgenError:
        configs = registered_configs()
    found: dict[str, dict] = {}
    for name, cfg in configs.items():
        for key, field in cfg.model_fields.items():
            if key == "policy":
                continue
            entry = found.setdefault(key, {"flag": cfg.cli_names.get(key, key), "type": field.annotation,
                                           "help": field.description or key, "policies": []})
            entry["policies"].append(name)
    out = []
    for key, e in found.items():
        kind = e["type"] if e["type"] in (int, float, bool) else str
        scope = "" if len(e["policies"]) == len(configs) else f" ({', '.join(e['policies'])})"
        out.append(MemoryOption(key, e["flag"], kind, e["help"].rstrip(".") + "." + scope, tuple(e["policies"])))
    return out


def with_memory_options(hidden: bool):
    """Add a keyword parameter (``--<flag>``) per :func:`memory_options` to a command taking ``**memory``.

    ``hidden``: the flags exist only to be refused (``resume``), so they take any text and are not shown."""

    def decorate(fn):
        sig = pyinspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        annotations = {p.name: p.annotation for p in params}
        for opt in memory_options():
            kind = str if hidden else opt.type
            decl = f"--{opt.flag.replace('_', '-')}"
            if kind is bool and not hidden:
                decl = f"{decl}/--no-{opt.flag.replace('_', '-')}"
            default = typer.Option(None, decl, help=opt.help, hidden=hidden)
            params.append(pyinspect.Parameter(opt.key, pyinspect.Parameter.KEYWORD_ONLY, default=default,
                                              annotation=Optional[kind]))
            annotations[opt.key] = Optional[kind]
        fn.__signature__ = sig.replace(parameters=params)
        fn.__annotations__ = {**annotations, "return": None}
        return fn

    return decorate


def memory_overrides(storyboard, memory: str | None, opts: dict) -> object:
    """The storyboard's memory section with CLI overrides applied (validated; errors name the flag)."""
    from pydantic import ValidationError

    from slotgen.memory.registry import UnknownPolicyError, parse_memory_config, policy_names

    given = {k: v for k, v in opts.items() if v is not None}
    if memory is None and not given:
        return storyboard.memory
    fields = set(storyboard.memory.model_fields_set)
    base = storyboard.memory.model_dump(include=fields)  # the keys the storyboard gave; presets fill the rest
    if "policy" not in base and "preset" not in given and "preset" not in base:
        base["policy"] = storyboard.memory.policy  # no memory section and no preset: the default policy
    if memory is not None and memory != base.get("policy"):
        # a different policy starts from its own defaults (and the preset's keys), keeping the preset
        base = {"policy": memory, **({"preset": base["preset"]} if "preset" in base else {})}
    base.update(given)
    try:
        return parse_memory_config(base)
    except UnknownPolicyError:
        if "policy" not in base:
            from slotgen.engine.presets import preset_names

            raise SlotgenError(f"--preset: unknown attention preset {base.get('preset')!r}; expected one of "
                               f"{', '.join(preset_names())}") from None
        raise SlotgenError(f"--memory: unknown policy {base['policy']!r}; expected one of "
                           f"{', '.join(policy_names())}") from None
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][-1]) if err["loc"] else "memory"
        flag = {o.key: o.flag for o in memory_options()}.get(key, key).replace("_", "-")
        if err["type"] == "extra_forbidden":
            raise SlotgenError(f"--{flag} does not apply to memory policy {base.get('policy')!r}") from None
        raise SlotgenError(f"--{flag}: {err['msg'][0].lower() + err['msg'][1:]}") from None


def _progress_callbacks(quiet: bool, total_chunks: int, total_frames: int):
    """A rich progress bar on a terminal; nothing otherwise (keeps logs and pipes clean)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from slotgen.pace import SteadyPace, clock

    if quiet or not err_console.is_terminal:
        return None, None
    progress = Progress(
        TextColumn("[bold]{task.fields[prompt]}"),
        BarColumn(bar_width=16),
        TextColumn("chunk"),
        MofNCompleteColumn(),
        TextColumn("{task.fields[video]:.1f}s video"),
        TextColumn("{task.fields[gfps]:.1f} frames/s"),
        TextColumn("ETA {task.fields[eta]}"),  # from steady chunks only: never the compile or warm-up
        console=err_console,
        transient=False,
    )
    task = progress.add_task("render", total=total_chunks, prompt="", video=0.0, gfps=0.0, eta="-")
    pace = SteadyPace()

    def on_chunk(ev) -> None:
        width = max(12, err_console.width - 70)  # leave room for the numeric columns
        text = ev.prompt if len(ev.prompt) <= width else ev.prompt[: width - 1] + "…"
        pace.add(ev.chunk_seconds)
        progress.update(task, completed=ev.chunk + 1, prompt=text, video=ev.video_seconds_done, gfps=ev.generation_fps,
                        eta=clock(pace.remaining(ev.total_chunks - ev.chunk - 1)))

    return progress, on_chunk


THREADS_HELP = ("CPU threads for generation (default: one fewer than the cores, leaving one to the overlapped "
                "decode and MP4 writer; OMP_NUM_THREADS, when set, is kept).")


@app.command()
@user_errors
@with_memory_options(hidden=False)
def render(
    storyboard: Path = typer.Argument(..., help="YAML storyboard of timed prompts."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output video (.mp4; .mkv = lossless FFV1). Default: <storyboard>.mp4"),
    lossless: Optional[Path] = typer.Option(None, "--lossless", help="Also write a lossless FFV1 .mkv copy (bit-exact frames)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Write memory statistics and timings as JSON (for `slotgen inspect`)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Write a snapshot at the end, to continue the story with `slotgen resume` (an interrupted render writes <output>.snapshot.pt anyway)."),
    snapshot_every: str = typer.Option("300", "--snapshot-every", help="Crash safety: every SECONDS of render time (or Nc: every N chunks) seal the videos so far and write the snapshot (--snapshot, else <output>.snapshot.pt), so a kill -9 or power cut loses at most that much; 0 turns it off. Renders shorter than this never pay for it. See docs/SNAPSHOTS.md."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the storyboard's seed."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the model: 'miniature', a pulled name (slotgen pull) or a local folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Causal generator weights for a Wan2.1 folder (Self-Forcing .pt, LongLive base+LoRA folder, diffusers transformer); see docs/REAL_MODEL.md."),
    slot_phi: Optional[str] = typer.Option(None, "--slot-phi", help="Slot projection φ for the slot memory: a slot_phi.safetensors trained for this model (`slotgen train-slots`), or 'training-free'. Default: the model folder's own."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory policy: window, sink, bank, slot, or a "
                                         "registered plug-in (see `slotgen.memory.registry`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the transformer blocks (slower start, faster chunks on a GPU)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    **memory_keys,
) -> None:
    """Render a storyboard to an MP4, streaming chunk by chunk (progress on stderr).

    Ctrl-C (SIGINT) or SIGTERM finishes the current chunk, closes a playable video with every frame so
    far, writes a snapshot and prints the command that resumes it (exit code 130).
    """
    from slotgen.models import load_model
    from slotgen.preflight import apply_cpu_threads, check_device
    from slotgen.render import Renderer, SnapshotEvery, stream_to_files
    from slotgen.storyboard import load_storyboard

    dev = check_device(device)
    apply_cpu_threads(dev, threads)
    if seed is not None and not 0 <= seed <= 2**63 - 1:
        raise SlotgenError(f"--seed: expected an integer from 0 to 2^63-1, got {seed}")
    every = SnapshotEvery.parse(snapshot_every)
    _check_video_extensions(output, lossless)
    sb = load_storyboard(storyboard)
    mem = memory_overrides(sb, memory, memory_keys)
    overrides = {k: v for k, v in {"seed": seed, "model": model}.items() if v is not None}
    if mem is not sb.memory:
        overrides["memory"] = mem
    if overrides:
        sb = sb.with_overrides(**overrides)
    output = output or Path(Path(storyboard).stem + ".mp4")
    _check_outputs([output, lossless, stats, snapshot or _default_snapshot(output)],
                   inputs=[("storyboard", storyboard), ("model", _model_path(sb.model)), ("checkpoint", checkpoint)])

    with _interruptible(), _model_line(sb, from_storyboard=model is None):
        bundle = (load_model(sb.model, device=dev, checkpoint=checkpoint, preset=sb.memory.preset)
                  if checkpoint is not None else None)
        renderer = Renderer(sb, bundle=bundle, device=dev, compile=compile, slot_phi=slot_phi)
        for w in renderer.warnings():
            print(f"warning: {w}", file=sys.stderr)
        if renderer.memory_line() and not quiet:
            print(renderer.memory_line(), file=sys.stderr)
        report = _run_streaming(quiet, renderer, lambda on_chunk, stop: stream_to_files(
            renderer, output, lossless=lossless, on_chunk=on_chunk, should_stop=stop, stats=stats, snapshot=snapshot,
            snapshot_every=every))
    _report(report, renderer, quiet, output, lossless=lossless)


def _default_snapshot(output: Path) -> Path:
    from slotgen.snapshot import default_snapshot_path

    return default_snapshot_path(output)


def _model_path(spec: Optional[str]) -> Optional[Path]:
    """A model given as a folder or file (an input no output may overwrite); None for a built-in."""
    from slotgen.models import BUILTIN_MODELS

    from slotgen.models.pull import resolve_model_path

    if spec is None or spec in BUILTIN_MODELS:
        return None
    return resolve_model_path(spec) or Path(spec).expanduser()


def _identity(p: Path) -> tuple:
    """What makes two names one file: the inode when it exists, else the resolved path."""
    try:
        st = os.stat(p)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(p.resolve()))


def _check_writable(p: Path) -> None:
    """Create and remove a probe file beside ``p``: a read-only or forbidden directory fails now, with its cause."""
    import tempfile

    from slotgen.errors import WriteError, write_cause

    try:
        fd, probe = tempfile.mkstemp(prefix=".slotgen-probe-", dir=p.parent if str(p.parent) else ".")
    except OSError as e:
        cause = write_cause(e, "", str(p.parent))
        raise WriteError(f"cannot write {str(p)!r}: {cause}", str(p), cause) from None
    os.close(fd)
    os.unlink(probe)


def _check_folder_writable(folder: Path, option: str) -> None:
    """Create ``folder`` (and its parents) if needed and probe that files can be written in it."""
    from slotgen.errors import WriteError, write_cause

    if folder.exists() and not folder.is_dir():
        raise SlotgenError(f"{option} {str(folder)!r}: is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        cause = write_cause(e, "", str(folder))
        raise WriteError(f"cannot create {str(folder)!r}: {cause}", str(folder), cause) from None
    _check_writable(folder / "probe")


def _check_video_extensions(output: Optional[Path], lossless: Optional[Path]) -> None:
    if output is not None and output.suffix.lower() not in (".mp4", ".mkv"):
        raise SlotgenError(f"-o {str(output)!r}: use .mp4 (H.264) or .mkv (lossless FFV1)")
    if lossless is not None and lossless.suffix.lower() != ".mkv":
        raise SlotgenError(f"--lossless {str(lossless)!r}: the lossless copy is FFV1 in Matroska; name it .mkv "
                           f"(an .mp4 would be lossy H.264)")


def _check_outputs(outputs: list[Optional[Path]], inputs: list[tuple[str, Optional[Path]]] = (),
                   allowed: set[tuple[int, int]] = frozenset()) -> None:
    """Fail before rendering (not after minutes of work) when an output cannot be written, names an input
    (same resolved path or same inode; an output inside an input folder too) or another output.

    ``allowed``: (output index, input index) pairs that may coincide (documented in-place updates)."""
    from slotgen.atomic import check_output_path

    given = [(i, p) for i, p in enumerate(outputs) if p is not None]
    for _, p in given:
        check_output_path(p)
        _check_writable(p)
    ids = [_identity(p) for _, p in given]
    for a in range(len(given)):
        for b in range(a + 1, len(given)):
            if ids[a] == ids[b]:
                raise SlotgenError(f"two outputs name the same file: {str(given[a][1])!r} and {str(given[b][1])!r}")
    for j, (what, src) in enumerate(inputs):
        if src is None or not src.exists():
            continue
        src_id, src_res = _identity(src), src.resolve()
        for (i, p), pid in zip(given, ids):
            if (i, j) in allowed:
                continue
            inside = src.is_dir() and src_res in p.resolve().parents
            if pid == src_id or inside:
                raise SlotgenError(f"output {str(p)!r} would overwrite the {what} {str(src)!r}"
                                   f"{' (it is inside that folder)' if inside else ''}; choose another name")


class _model_line:
    """A model named by the storyboard that cannot be loaded: the error points at its ``model:`` line."""

    def __init__(self, sb, from_storyboard: bool):
        self.sb, self.on = sb, from_storyboard

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from slotgen.errors import ModelError, StoryboardError

        if self.on and exc_type is not None and issubclass(exc_type, ModelError) \
                and not isinstance(exc, StoryboardError) and self.sb.line_of("model") is not None:
            raise self.sb.error_at(str(exc), "model") from None
        return False


class _interruptible:
    """Ctrl-C before or after the render proper (model loading, joining videos): exit 130, one line."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            print("interrupted: aborted, nothing was written", file=sys.stderr)
            raise typer.Exit(130)
        return False


def _run_streaming(quiet: bool, renderer, run):
    """``run(on_chunk, should_stop)`` with a progress bar and SIGINT/SIGTERM caught for its duration."""
    import signal as _signal

    from slotgen.render import InterruptGuard

    def notice(signum: int) -> None:
        name = _signal.Signals(signum).name
        print(f"{chr(10) if err_console.is_terminal else ''}{name}: finishing the current chunk, then saving the video and a snapshot "
              f"(send it again to abort without saving)", file=sys.stderr, flush=True)

    from slotgen.preflight import time_warning

    from slotgen.pace import SteadyPace

    progress, bar = _progress_callbacks(quiet, renderer.total_chunks(), renderer.storyboard.total_frames)
    pace, warned = SteadyPace(), {"done": False}

    def on_chunk(ev) -> None:
        if bar is not None:
            bar(ev)
        pace.add(ev.chunk_seconds)
        if not warned["done"] and pace.per_item is not None:  # measured at the steady pace, not the first chunk's
            warned["done"] = True
            w, h = renderer.size
            msg = time_warning(pace.per_item, ev.total_chunks - ev.chunk - 1, w, h)
            if msg:
                print(f"warning: {msg}", file=sys.stderr, flush=True)

    with InterruptGuard(notice) as guard:
        if progress is not None:
            with progress:
                return run(on_chunk, guard)
        return run(on_chunk, guard)


def _resume_command(snap: str, output: Path, lossless: Optional[Path]) -> list[str]:
    """The command that continues every output of an interrupted run in place (the video and the lossless
    copy are extended, the snapshot refreshed), so it can be repeated after another interruption."""
    cmd = ["slotgen", "resume", snap, "-o", str(output), "--append"]
    if lossless is not None:
        cmd += ["--lossless", str(lossless)]
    return cmd + ["--snapshot", snap]


def _report(report, renderer, quiet: bool, output: Path, resume_cmd: Optional[list[str]] = None,
            lossless: Optional[Path] = None) -> None:
    import shlex

    for note in renderer.notes:
        print(f"warning: {note}", file=sys.stderr)
    fps = renderer.storyboard.fps
    if report.interrupted:
        done = report.first_frame + report.frames
        print(f"interrupted: wrote {', '.join(report.outputs)} ({report.frames} new frames; {done} of "
              f"{report.total_frames} frames of the story, {done / fps:.2f}s) and snapshot {report.snapshot}",
              file=sys.stderr)
        if resume_cmd is None:
            resume_cmd = _resume_command(report.snapshot, output, lossless)
        print("resume with: " + " ".join(shlex.quote(a) for a in resume_cmd), file=sys.stderr, flush=True)
        raise typer.Exit(130)
    if not quiet:
        extra = f", snapshot {report.snapshot}" if report.snapshot else ""
        where = f" after frame {report.first_frame} (story now {report.total_frames / fps:.2f}s)" if report.first_frame else ""
        print(f"wrote {', '.join(report.outputs)}{extra}: {report.frames} frames ({report.frames / fps:.2f}s at {fps} fps)"
              f"{where}, {len(report.chunk_seconds)} chunks in {report.elapsed:.1f}s", file=sys.stderr)


@app.command()
@user_errors
@with_memory_options(hidden=True)
def resume(
    snapshot: Path = typer.Argument(..., help="Snapshot written by `slotgen render --snapshot` (or by an interrupted render)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the continuation goes (.mp4; .mkv = lossless). With --append: the joined video."),
    storyboard: Optional[Path] = typer.Option(None, "--storyboard", "-s", help="More prompts (YAML); its times count from the END of the snapshot's storyboard."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Continue with this prompt (with --duration)."),
    duration: Optional[str] = typer.Option(None, "--duration", "-d", help="How long --prompt lasts, e.g. 10s or 1m30s."),
    append: bool = typer.Option(False, "--append", help="Write a copy of the original video (recorded in the snapshot) followed by the continuation to -o."),
    append_to: Optional[Path] = typer.Option(None, "--append-to", help="The original video to join (implies --append)."),
    lossless: Optional[Path] = typer.Option(None, "--lossless", help="Also write the continuation as lossless FFV1 .mkv."),
    new_snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Snapshot the end of the continuation (to extend the story again). May be the input snapshot."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Write memory statistics and timings as JSON."),
    model: Optional[str] = typer.Option(None, "--model", help="Where the snapshot's model is now (its weights digest must match)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The causal checkpoint the render used (Wan2.1 folders)."),
    slot_phi: Optional[str] = typer.Option(None, "--slot-phi", help="Where the render's slot φ file is now (default: the path the snapshot recorded; its digest must match)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    snapshot_every: str = typer.Option("300", "--snapshot-every", help="Crash safety: every SECONDS of render time (or Nc: every N chunks) seal the videos so far and write the snapshot (--snapshot, else <output>.snapshot.pt), so a kill -9 or power cut loses at most that much; 0 turns it off. Renders shorter than this never pay for it. See docs/SNAPSHOTS.md."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", hidden=True),
    memory: Optional[str] = typer.Option(None, "--memory", hidden=True),
    fps: Optional[str] = typer.Option(None, "--fps", hidden=True),
    resolution: Optional[str] = typer.Option(None, "--resolution", hidden=True),
    **memory_keys,
) -> None:
    """Continue a snapshot: more prompts (--storyboard or --prompt/--duration), bit-identical to one long render.

    Seed, memory configuration, frame rate, resolution and sampler come from the snapshot. Without
    new prompts, an interrupted render's snapshot finishes its own storyboard.
    """
    from slotgen.preflight import apply_cpu_threads, check_device
    from slotgen.render import SnapshotEvery
    from slotgen.resume import RESUME_FIXED_KEYS, prepare_resume

    dev = check_device(device)
    apply_cpu_threads(dev, threads)
    from slotgen.timeparse import parse_time

    flags = {o.key: o.flag for o in memory_options()}
    fixed = [(name, name, value) for name, value in (("seed", seed), ("memory", memory), ("fps", fps),
                                                     ("resolution", resolution))]
    fixed += [(flags[key], "memory", value) for key, value in memory_keys.items()]
    for flag, key, value in fixed:
        if value is not None:
            raise SlotgenError(f"--{flag.replace('_', '-')} cannot change on resume: {RESUME_FIXED_KEYS[key]} comes "
                               f"from the snapshot (render a new story to change it)")
    if output is None:
        raise SlotgenError("resume needs -o/--output: where to write the continuation (with --append: the joined video)")
    dur = None
    if duration is not None:
        try:
            dur = parse_time(duration)
        except ValueError as e:
            raise SlotgenError(f"--duration: {e}") from None
    more = None
    if storyboard is not None:
        from slotgen.storyboard import load_storyboard

        more = load_storyboard(storyboard)
    every = SnapshotEvery.parse(snapshot_every)
    _check_video_extensions(output, lossless)
    # the input snapshot may be refreshed in place (--snapshot, or the default <output>.snapshot.pt)
    _check_outputs([output, lossless, stats, new_snapshot or _default_snapshot(output)],
                   inputs=[("snapshot", snapshot), ("storyboard", storyboard), ("model", _model_path(model)),
                           ("checkpoint", checkpoint)], allowed={(3, 0)})

    with _interruptible():
        job = prepare_resume(snapshot, output, storyboard=more, prompt=prompt, duration=dur, append=append,
                             append_to=append_to, device=dev, model=model, checkpoint=checkpoint, slot_phi=slot_phi)
        renderer, original = job.renderer, job.original
        for w in renderer.warnings():
            print(f"warning: {w}", file=sys.stderr)
        report = _run_streaming(quiet, renderer, lambda on_chunk, stop: job.stream(
            lossless=lossless, on_chunk=on_chunk, should_stop=stop, stats=stats, snapshot_out=new_snapshot,
            snapshot_every=every))
    _report(report, renderer, quiet, output, lossless=lossless)


def policy_list(text: str) -> list[str]:
    """``--policies window,slot`` → ["window", "slot"], each a registered memory policy."""
    from slotgen.memory.registry import policy_names

    names = [p.strip() for p in text.split(",") if p.strip()]
    for n in names:
        if n not in policy_names():
            raise SlotgenError(f"--policies: unknown policy {n!r}; expected some of {', '.join(policy_names())}")
    if not names:
        raise SlotgenError("--policies: name at least one memory policy")
    return names


def memory_spec_list(text: str) -> list[str]:
    """``--policies window,sink@longlive:window=9`` → one memory spec each (``POLICY[@PRESET][:KEY=VALUE...]``,
    see :func:`slotgen.bench.speed.memory_spec`), each a valid memory section."""
    from pydantic import ValidationError

    from slotgen.bench.speed import memory_spec
    from slotgen.memory.registry import UnknownPolicyError, parse_memory_config, policy_names

    names = [p.strip() for p in text.split(",") if p.strip()]
    for n in names:
        try:
            parse_memory_config(memory_spec(n))
        except UnknownPolicyError:
            raise SlotgenError(f"--policies: unknown policy in {n!r}; expected some of {', '.join(policy_names())}") from None
        except (ValueError, ValidationError) as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise SlotgenError(f"--policies: {n!r}: {msg}") from None
    if not names:
        raise SlotgenError("--policies: name at least one memory policy")
    return names


def positive_numbers(text: str, option: str, example: str) -> list[float]:
    """``"60,600"`` → ``[60.0, 600.0]``: one or more finite numbers above 0, comma-separated, or a
    :class:`SlotgenError` naming the option."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise SlotgenError(f"{option}: expected positive {example}, got {text!r}")
    return values


def resolution_option(text: str, option: str = "--resolution") -> tuple[int, int]:
    """``"WxH"`` → ``(width, height)``, both positive multiples of 16 (every Wan2.1 model's stride:
    VAE 8 × patch 2), or a :class:`SlotgenError` naming the option."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SlotgenError(f"{option}: expected WxH like 832x480, got {text!r}") from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise SlotgenError(f"{option}: width and height must be positive multiples of 16, got {text!r}")
    return width, height


def _bench_progress(what: str, total: Optional[int]):
    """A bench command's progress on stderr, as each item (a run, a policy, a chunk) starts: a rich bar on a
    terminal (the item, how many, elapsed time), one line per item otherwise. Returns (context, on_item)."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not err_console.is_terminal:
        count = {"n": 0}

        def line(label: str) -> None:
            count["n"] += 1
            of = f"/{total}" if total else ""
            print(f"{what} {count['n']}{of}: {label}", file=sys.stderr, flush=True)

        return contextlib.nullcontext(), line
    progress = Progress(SpinnerColumn(), TextColumn(f"[bold]{what}[/]"), BarColumn(bar_width=20), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True)
    task = progress.add_task("", total=total)
    started = {"n": 0}

    def on_item(label: str) -> None:
        progress.update(task, completed=started["n"], description=label)
        started["n"] += 1

    return progress, on_item


def _bench_output(table, json_out: Optional[Path], data) -> None:
    """A bench command's ending: the rows as JSON when asked, then the table."""
    import json as _json

    if json_out is not None:
        atomic_write_bytes(json_out, (_json.dumps(data, indent=2) + "\n").encode())
    Console(width=200).print(table)


@bench_app.command("speed")
@user_errors
def bench_speed(
    policies: str = typer.Option("window,sink", "--policies", help="Comma-separated memory policies, run side by side; "
                                 "each POLICY[@PRESET][:KEY=VALUE...], e.g. sink:window=6,sink@longlive."),
    duration: str = typer.Option("60", "--duration", help="Video seconds; comma-separated for several (e.g. 60,600)."),
    model: str = typer.Option("miniature", "--model", help="'miniature', 'wan-1.3b-random' or a local folder."),
    device: str = typer.Option("cpu", "--device"),
    resolution: Optional[str] = typer.Option(None, "--resolution", help="WxH (default: the model's)."),
    fps: Optional[int] = typer.Option(None, "--fps", min=1, max=120),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Render exactly N chunks instead of --duration."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=50, help="Sampler steps (default: the model's)."),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Run the list N times interleaved; report medians."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Render the same storyboard with each policy (fresh process each) and print a timing table."""
    from rich.table import Table

    from slotgen.bench.speed import run_speed_bench
    from slotgen.preflight import check_device

    check_device(device)
    names = memory_spec_list(policies)
    durations = positive_numbers(duration, "--duration", "seconds like 60 or 60,600")
    if resolution is not None:
        resolution_option(resolution)
    shown, on_item = _bench_progress("bench speed", len(names) * len(durations) * repeat)
    with shown:
        rows = run_speed_bench(names, durations, model=model, device=device, resolution=resolution, fps=fps,
                               chunks=chunks, steps=steps, repeat=repeat, on_item=on_item)
    base = {r["video_s"]: r for r in rows if r["policy"] == names[0]}
    table = Table(title=f"slotgen bench speed — {rows[0]['model']} on {device} at {rows[0]['resolution']}")
    for col in ("policy", "video s", "wall s", "×realtime", "gen fps", "chunk ms p50", "p95", "vs " + names[0],
                "drift", "peak RSS MB", "RSS growth", "memory MB", *(["peak GPU MB"] if "peak_gpu_mb" in rows[0] else [])):
        table.add_column(col, justify="right")
    for r in rows:
        ratio = r["chunk_ms_median"] / base[r["video_s"]]["chunk_ms_median"]
        table.add_row(r["policy"], f"{r['video_s']:.1f}", f"{r['wall_s']:.2f}", f"{r['realtime_x']:.2f}",
                      f"{r['gen_fps']:.1f}", f"{r['chunk_ms_median']:.1f}", f"{r['chunk_ms_p95']:.1f}", f"{ratio:.3f}",
                      "-" if r["drift"] is None else f"{r['drift']:.3f}", f"{r['peak_rss_mb']:.0f}",
                      "-" if r.get("rss_growth") is None else f"{r['rss_growth']:.3f}",
                      f"{r['memory_bytes'] / 2**20:.2f}", *([f"{r['peak_gpu_mb']:.0f}"] if "peak_gpu_mb" in r else []))
    _bench_output(table, json_out, rows)


@bench_app.command("syncs")
@user_errors
def bench_syncs(
    policies: str = typer.Option("window,sink,bank,slot", "--policies", help="Comma-separated memory settings, "
                                 "POLICY[@PRESET][:KEY=VALUE...] (e.g. sink@longlive, bank@memflow:write_every=1)."),
    model: str = typer.Option("miniature", "--model", help="'miniature', 'wan-1.3b-random' or a local folder."),
    device: str = typer.Option("cpu", "--device"),
    resolution: Optional[str] = typer.Option(None, "--resolution", help="WxH (default: the model's)."),
    chunks: int = typer.Option(6, "--chunks", min=1, help="Chunks per policy (a prompt switch at the last but one)."),
    steps: int = typer.Option(4, "--steps", min=1, help="Sampler steps."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the per-chunk rows as JSON."),
) -> None:
    """Host-device syncs and operator launches per chunk for each policy (SyncProbe), after chunk 0."""
    import statistics

    from rich.table import Table

    from slotgen.bench.speed import memory_spec
    from slotgen.bench.syncs import count_per_chunk
    from slotgen.models import load_model

    names = memory_spec_list(policies)
    if chunks < 3:
        raise SlotgenError("--chunks: at least 3 (a warm-up chunk, a steady one and a prompt switch)")
    size = resolution_option(resolution) if resolution is not None else None
    bundle = load_model(model, device=device)
    table = Table(title=f"slotgen bench syncs — {bundle.name} on {device}, per chunk after chunk 0")
    for col in ("policy", "syncs median", "syncs max", "at the switch", "ops median", "sources (chunk 1)"):
        table.add_column(col, justify="right")
    out = {}
    shown, on_item = _bench_progress("bench syncs", len(names))
    with shown:
        runs = {}
        for name in names:
            on_item(name)
            runs[name] = count_per_chunk(bundle, memory_spec(name), chunks, switch_at=chunks - 2,
                                         width=size[0] if size else None, height=size[1] if size else None, steps=steps)
    for name in names:
        rows = runs[name]
        out[name] = [{k: v for k, v in r.items() if k != "stats"} for r in rows]
        later = rows[1:]
        table.add_row(name, f"{statistics.median(r['syncs'] for r in later):g}", str(max(r["syncs"] for r in later)),
                      str(rows[chunks - 2]["syncs"]), f"{statistics.median(r['ops'] for r in later):g}",
                      " ".join(f"{k}×{v}" for k, v in rows[1]["sources"].items()))
    _bench_output(table, json_out, out)


@bench_app.command("flops")
@user_errors
def bench_flops(
    model: str = typer.Option("wan-1.3b-random", "--model", help="'wan-1.3b-random' (the Wan2.1-T2V-1.3B architecture) or 'miniature'."),
    resolution: str = typer.Option("832x480", "--resolution", help="WxH."),
    memory: Optional[list[str]] = typer.Option(None, "--memory", help="A memory setting, 'policy[:key=value,...]' "
                                               "(e.g. sink:sink=3,window=6); repeat for several. Default: each "
                                               "policy at its defaults."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising forwards per chunk (default: the model's); "
                                        "the commit forward is added."),
    tflops: str = typer.Option("989", "--tflops", help="Sustained TFLOP/s for the FPS ceiling; comma-separated "
                               "for several."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """FLOPs per chunk of the transformer and the VAE (counted on the meta device) and the FPS ceiling."""

    from rich.table import Table

    from slotgen.bench.flops import count_flops, parse_memory_spec

    width, height = resolution_option(resolution)
    rates = positive_numbers(tflops, "--tflops", "numbers like 100,400")
    specs = [parse_memory_spec(m) for m in (memory or ["window", "sink", "bank", "slot"])]
    shown, on_item = _bench_progress("bench flops", len(specs))
    with shown:
        rows = count_flops(model, width, height, specs, steps=steps, on_item=on_item)
    table = Table(title=f"slotgen bench flops — {model} at {width}x{height}, TFLOP per chunk")
    for col in ("memory", "memory tokens", "transformer / forward", "transformer / chunk", "VAE / chunk", "total",
                *(f"FPS at {r:g} TFLOP/s" for r in rates)):
        table.add_column(col, justify="right")
    for spec, r in zip(specs, rows):
        label = ",".join(f"{k}={v}" for k, v in spec.items() if k != "policy")
        table.add_row(f"{r.policy} {label}".strip(), str(r.memory_tokens), f"{r.transformer_tflop_per_forward:.4g}",
                      f"{r.transformer_tflop_per_chunk:.5g}", f"{r.vae_tflop_per_chunk:.4g}",
                      f"{r.total_tflop_per_chunk:.5g}", *(f"{r.fps_at(x):.4g}" for x in rates))
    _bench_output(table, json_out, [{**spec, **r.__dict__, "total_tflop_per_chunk": r.total_tflop_per_chunk}
                                    for spec, r in zip(specs, rows)])


@bench_app.command("policy-cost")
@user_errors
def bench_policy_cost(
    resolution: str = typer.Option("832x480", "--resolution", help="WxH of the simulated Wan chunk."),
    chunks: int = typer.Option(12, "--chunks", min=1, help="Chunks fed to every policy."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated memory policies (default: every registered one)."),
    layers: int = typer.Option(4, "--layers", help="Layers simulated (memory: ~0.23 GB per layer and policy)."),
    miniature_slot_defaults: bool = typer.Option(False, "--miniature-slot-defaults", help="slot with its miniature defaults instead of docs/MEMORY.md's full-size values."),
) -> None:
    """A policy's own bookkeeping per chunk at full Wan2.1-1.3B shapes, without the model (one JSON line per policy)."""
    import json as _json

    from slotgen.bench.policy_cost import run
    from slotgen.memory.registry import policy_names

    names = policy_list(policies) if policies is not None else list(policy_names())
    w, h = resolution_option(resolution)
    if chunks < 1 or layers < 1:
        raise SlotgenError("--chunks and --layers must be at least 1")
    shown, on_item = _bench_progress("bench policy-cost", chunks)
    with shown:
        rows = run((w, h), chunks, names, not miniature_slot_defaults, layers=layers, on_item=on_item)
    for row in rows:
        print(_json.dumps(row))


@bench_app.command("snapshot-sizes")
@user_errors
def bench_snapshot_sizes(
    durations: str = typer.Option("60,600", "--durations", help="Video seconds, comma-separated."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated memory policies (default: every registered one)."),
    model: str = typer.Option("miniature", "--model"),
    device: str = typer.Option("cpu", "--device"),
    resolution: Optional[str] = typer.Option(None, "--resolution", help="WxH (default: the model's)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampler steps (default: the model's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Snapshot size per policy after long renders (no video written): bounded memory, bounded snapshots."""
    import json as _json

    from slotgen.bench.snapshot_size import snapshot_sizes
    from slotgen.preflight import check_device

    check_device(device)
    seconds = positive_numbers(durations, "--durations", "seconds like 60,600")
    if resolution is not None:
        resolution_option(resolution)
    names = policy_list(policies) if policies is not None else None
    from slotgen.memory.registry import policy_names

    shown, on_item = _bench_progress("bench snapshot-sizes", len(names or policy_names()) * len(seconds))
    with shown:
        rows = snapshot_sizes(seconds, names, model=model, device=device, resolution=resolution, steps=steps,
                              on_item=on_item)
    if json_out is not None:
        atomic_write_bytes(json_out, (_json.dumps(rows, indent=2) + "\n").encode())


@app.command()
@user_errors
def inspect(
    source: Path = typer.Argument(..., help="A snapshot (.pt) or a --stats JSON written by `slotgen render`."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    png: Optional[Path] = typer.Option(None, "--png", help="Draw the last chunk's token→slot map and retrieved items (slot policy)."),
    summary: bool = typer.Option(False, "--summary", help="For a snapshot: print its facts (model, position, prompts, video) as JSON instead."),
    video: Optional[Path] = typer.Option(None, "--video", help="With --png: the video whose frames go under the slot map (default: the one the stats or snapshot records, lossless copy first)."),
) -> None:
    """Dump memory statistics: per layer slots, items, tokens held, budget use, age, hits, relevance."""
    import json as _json

    from slotgen.inspect import build_report, load_stats, report_table, write_png

    if png is not None:
        if png.suffix.lower() != ".png":
            raise SlotgenError(f"--png {str(png)!r}: the picture is a PNG; name it .png")
        _check_outputs([png], inputs=[("input", source)])
    if summary:
        from slotgen.snapshot import load_snapshot

        print(_json.dumps(load_snapshot(source).summary(), indent=2))
        return
    stats, extra = load_stats(source)
    report = build_report(stats, str(source))
    if png is not None:
        from slotgen.inspect import underlay_frames

        if video is not None and not video.is_file():
            raise SlotgenError(f"--video {str(video)!r}: no such file")
        under = underlay_frames(stats, extra, video)
        write_png(stats, png, frames=under)
        if not under:
            print(f"note: {png}: no video found to draw the frames under the slots (give --video)", file=sys.stderr)
    if json_out:
        print(_json.dumps(report, indent=2))
    else:
        Console(width=160).print(report_table(report))
        if png is not None:
            print(f"wrote {png}", file=sys.stderr)


@app.command("import-longlive")
@user_errors
def import_longlive(
    prompts_file: Path = typer.Argument(..., help="LongLive/MemFlow interactive prompts: one {\"prompts\": [...]} per line."),
    switch_frame_indices: str = typer.Option(..., "--switch-frame-indices",
                                             help="Latent frames where the next prompt takes over, e.g. 40,80,120,160,200."),
    frames: int = typer.Option(..., "--frames", help="Latent frames per video (LongLive's num_output_frames, e.g. 240)."),
    output: Path = typer.Option(..., "-o", "--output",
                                help="Storyboard file (one video) or folder (one <name>-<line>.yaml per video)."),
    model: str = typer.Option("miniature", "--model", help="The storyboard's model: a Wan2.1 folder for LongLive weights."),
    line: Optional[int] = typer.Option(None, "--line", help="Only the video on this line (1 = the first)."),
    seed: int = typer.Option(0, "--seed"),
    fps: int = typer.Option(16, "--fps", min=1),
) -> None:
    """Turn a LongLive interactive prompt file (JSONL) into storyboards with the same switch chunks."""
    from slotgen.atomic import atomic_output
    from slotgen.storyboard.longlive import longlive_storyboard_yaml, parse_switch_frames, read_longlive_prompts

    videos = read_longlive_prompts(prompts_file)
    switches = parse_switch_frames(switch_frame_indices)
    if line is not None:
        if not 1 <= line <= len(videos):
            raise SlotgenError(f"--line {line}: {prompts_file} holds {len(videos)} videos")
        chosen = [(line, videos[line - 1])]
    else:
        chosen = list(enumerate(videos, 1))
    texts = [(n, longlive_storyboard_yaml(p, switches, frames, model=model, fps=fps, seed=seed,
                                          title=f"{prompts_file.stem} line {n}")) for n, p in chosen]
    if len(texts) == 1 and output.suffix in (".yaml", ".yml"):
        targets = [output]
    else:
        if output.suffix in (".yaml", ".yml"):
            raise SlotgenError(f"{prompts_file} holds {len(texts)} videos: give a folder as --output, or --line N")
        output.mkdir(parents=True, exist_ok=True)
        targets = [output / f"{prompts_file.stem}-{n}.yaml" for n, _ in texts]
    for target, (_, text) in zip(targets, texts):
        with atomic_output(target) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)


def _command_line() -> str:
    """The command as typed (for a model card), shell-quoted."""
    import shlex

    return "slotgen " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _progress_log(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(m, flush=True))


@app.command("train-miniature")
@user_errors
def train_miniature_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for the trained miniature (config, weights, MODEL_CARD.md, loss.png)."),
    minutes: float = typer.Option(55.0, "--minutes", help="Wall-clock budget, data included (ignored with --steps)."),
    seed: int = typer.Option(0, "--seed", help="Seeds data, init, noise and batches."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Exact transformer steps (reproducible) instead of the time budget."),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="World episodes in the dataset (default 256; sprites 512)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Sequences per step (default 8)."),
    clip_chunks: Optional[int] = typer.Option(None, "--clip-chunks", help="Noisy chunks per sequence (default 4; sprites 3)."),
    placement_weight: Optional[float] = typer.Option(None, "--placement-weight", help="Loss weight of the chunks whose caption places the entity (default 1; sprites 4: entrance and return)."),
    trait_weight: Optional[float] = typer.Option(None, "--trait-weight", help="Loss weight of the latent cells holding a sprite's trait, its dot (default 1; sprites 8)."),
    trait_from: Optional[int] = typer.Option(None, "--trait-from", help="Step from which --trait-weight applies (default 0; ×1 before it: the layout first)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads (2 on an idle 2-core machine; 1 next to another job). "
                                "It changes float rounding: bit-exact re-runs need the same value."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N. Batches and random draws stay on the CPU "
                               "(seeded); on a GPU use a larger --batch."),
    world: str = typer.Option("standard", "--world", help="The world to learn: standard, reduced or sprites (docs/WORLD.md)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between resumable checkpoints (default 250; 0: none)."),
    snapshot_every: Optional[int] = typer.Option(None, "--snapshot-every", help="Steps between loadable folders OUT/snapshots/step-N (default 0: none)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint, step for step (its own settings)."),
    slot_steps: Optional[int] = typer.Option(None, "--slot-steps", min=1, help="Steps of the last stage, SlotMemory's φ (default 400; scaled down with a --minutes budget under 55)."),
    slot_episodes: Optional[int] = typer.Option(None, "--slot-episodes", min=2, help="Ground-truth episodes of the φ stage (default 48; scaled down like --slot-steps)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train the miniature's transformer on the shape world (causal chunks, x0-prediction, memory
    handed back as relocated context); the VAE is the exact pixel code and the text encoder frozen."""
    from slotgen.preflight import check_device
    from slotgen.stops import stoppable
    from slotgen.train.miniature import TrainConfig, fit_to_budget, train_miniature

    check_device(device)
    cfg = TrainConfig.for_world(world, minutes=minutes, seed=seed, steps=steps, threads=threads, device=device)
    given = set()
    for name, v in (("episodes", episodes), ("batch", batch), ("clip_chunks", clip_chunks), ("placement_weight", placement_weight),
                    ("trait_weight", trait_weight), ("trait_from", trait_from),
                    ("checkpoint_every", checkpoint_every), ("snapshot_every", snapshot_every)):
        if v is not None:
            setattr(cfg, name, v)
            given.add(name)
    for name, v in (("steps", slot_steps), ("episodes", slot_episodes)):
        if v is not None:
            setattr(cfg.slots, name, v)
            given.add(f"slots.{name}")
    if not resume:
        cfg.validate()
        fit_to_budget(cfg, given)  # --minutes 1 ends near 1 minute: data and the slot stage scale with it
    _check_folder_writable(out, "--out")  # before minutes of data rendering, not after
    again = f"slotgen train-miniature --out {_quote(out)} --resume"
    progress, on_step = _train_progress(quiet)
    with stoppable(lambda sig: f"{sig}: finishing the current step, then writing the checkpoint (send it again to "
                               f"abort; the last periodic checkpoint stays)",
                   f"interrupted: aborted; the last periodic checkpoint in {out} stays (none before --checkpoint-every "
                   f"steps): {again}") as should_stop, progress:
        res = train_miniature(cfg, out, log=_progress_log(quiet), command=_command_line(), resume=resume,
                              should_stop=should_stop, on_step=on_step)
    if res.interrupted:
        print(f"interrupted: checkpoint after step {res.steps} in {out}; resume with: {again}", file=sys.stderr)
        raise typer.Exit(130)
    print(f"wrote {out}")


def _quote(p) -> str:
    import shlex

    return shlex.quote(str(p))


def _train_progress(quiet: bool):
    """A rich bar for a training run on a terminal (steps, or the share of a time budget; loss; ETA from
    the steps' own pace, made once the bar starts at the first step, after data and model set-up)."""
    import contextlib

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if quiet or not err_console.is_terminal:
        return contextlib.nullcontext(), None
    progress = Progress(TextColumn("[bold]training[/]"), BarColumn(bar_width=24), TextColumn("step {task.fields[step]}"),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, transient=False)
    task: dict = {}

    def on_step(step: int, budget, loss: float) -> None:
        if "id" not in task:
            task["id"] = progress.add_task("train", total=1.0, step=step, loss=loss)
        progress.update(task["id"], completed=min(1.0, budget.progress()), step=step, loss=loss)

    return progress, on_step


@app.command("train-slots")
@user_errors
def train_slots_cmd(
    model: str = typer.Option(..., "--model", help="The model: a folder (φ goes into it as slot_phi.safetensors) or a built-in name (then --out)."),
    storyboards: Optional[Path] = typer.Option(None, "--storyboards", help="Learn from the model's own renders of these storyboards (*.yaml)."),
    videos: Optional[Path] = typer.Option(None, "--videos", help="Learn from these clips (*.mp4, *.mkv, *.webm, *.mov), encoded with the model's VAE; a CLIP.txt beside a clip is its caption."),
    out: Optional[Path] = typer.Option(None, "--out", help="The φ file to write (default: MODEL/slot_phi.safetensors)."),
    supervised: bool = typer.Option(False, "--supervised", help="Miniature only: train with the shape world's ground-truth masks (the benchmark's supervised φ) instead of without labels."),
    seed: int = typer.Option(0, "--seed", help="Seeds the cells kept, the init and the batches (and the episodes when supervised)."),
    steps: int = typer.Option(400, "--steps", min=1, help="Optimiser steps."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Chunks per step (default 32; 64 supervised)."),
    temporal_weight: float = typer.Option(0.0, "--temporal-weight", help="Weight of the temporal similarity term (0, the default: reconstruction only)."),
    contrast_weight: float = typer.Option(0.0, "--contrast-weight", help="Weight of the slot contrast across consecutive chunks (0: off)."),
    target: str = typer.Option("keys", "--target", help="What the slots explain: 'keys' (unit keys), 'standardised' (per-channel standardised keys, φ reading them scaled) or 'similarity' (each token's key affinity within its chunk)."),
    dim: int = typer.Option(32, "--dim", help="D', the size of φ's output (slot features)."),
    cells: int = typer.Option(256, "--cells", help="Grid cells kept per latent frame."),
    max_chunks: int = typer.Option(2000, "--max-chunks", help="Chunks collected at most."),
    width: Optional[int] = typer.Option(None, "--width", help="Clip width the model sees (default: the model's)."),
    height: Optional[int] = typer.Option(None, "--height", help="Clip height the model sees (default: the model's)."),
    prompt: str = typer.Option("", "--prompt", help="Caption for clips without a CLIP.txt."),
    episodes: int = typer.Option(48, "--episodes", min=1, help="--supervised: ground-truth world episodes to commit."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint beside --out (same settings and sources)."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Steps between checkpoints (one is also written after every source; 0: only on a stop)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    threads: int = typer.Option(2, "--threads", help="CPU threads (a run repeats exactly with the same seed and thread count)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train SlotMemory's slot projection φ for a model, without labels, on its own keys (slot attention,
    key reconstruction; optional temporal and slot-contrast terms), and write slot_phi.safetensors. Ctrl-C, SIGTERM
    or a closed terminal write a checkpoint (exit 130/143; a second signal aborts, keeping the last
    periodic one); --resume continues it."""
    if threads < 1:
        raise SlotgenError(f"--threads must be at least 1, got {threads}")
    if (width is None) != (height is None):
        raise SlotgenError("--width and --height go together")
    import torch

    from slotgen.preflight import check_device

    torch.set_num_threads(threads)
    if supervised:
        from slotgen.train.slots import SlotTrainConfig, add_slot_phi

        cfg = SlotTrainConfig(seed=seed, episodes=episodes, steps=steps, batch=batch or 64)
        cfg.validate()
        folder = Path(model)
        if not (folder / "weights.safetensors").is_file() or not (folder / "config.json").is_file():
            raise SlotgenError(f"--supervised: --model {model} is not a miniature folder (needs config.json and "
                               f"weights.safetensors); only the shape world has masks")
        from slotgen.stops import stoppable

        with stoppable(lambda sig: sig, f"interrupted: stopped before φ was written; {folder} is unchanged; rerun "
                                        f"the same command to train it", at_once=True):
            add_slot_phi(folder, cfg, log=_progress_log(quiet), command=_command_line(), out=out)
        print(f"wrote {out or folder / 'slot_phi.safetensors'}")
        return
    from slotgen.stops import say, stoppable
    from slotgen.train.slots_unsup import Stopped, UnsupConfig, train_slots

    cfg = UnsupConfig(seed=seed, steps=steps, batch=batch or 32, temporal_weight=temporal_weight, cells=cells,
                      max_chunks=max_chunks, contrast_weight=contrast_weight, target=target, dim=dim)
    cfg.validate()
    again = _command_line() + ("" if resume else " --resume")
    with stoppable(lambda sig: f"{sig}: finishing the current source or step, then writing the checkpoint (send it "
                               f"again to abort; the last periodic checkpoint stays)",
                   f"interrupted: aborted; the last checkpoint (after every source and --checkpoint-every steps) "
                   f"stays; resume with: {again}") as guard:
        try:
            path = train_slots(model, out, cfg, storyboards=storyboards, videos=videos, resume=resume, prompt=prompt,
                               device=check_device(device), size=(width, height) if width else None,
                               log=_progress_log(quiet), should_stop=lambda: guard.signum, command=_command_line(),
                               checkpoint_every=checkpoint_every)
        except Stopped as stop:
            say(f"interrupted: checkpoint {stop.checkpoint}; resume with: {again}")
            raise typer.Exit(stop.exit_code)
    print(f"wrote {path}")


@bench_app.command("identity")
@user_errors
def bench_identity(
    episodes: int = typer.Option(4, "--episodes", min=1, help="Seeded episodes per gap (plus as many similar-companion ones)."),
    gaps: str = typer.Option("12,36,72", "--gaps", help="Absence gaps in video frames (multiples of 12)."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated memory policies (default: every registered one)."),
    model: str = typer.Option("miniature", "--model", help="'miniature' or a miniature-format folder."),
    slot_phi: Optional[str] = typer.Option(None, "--slot-phi", help="The slot policy's φ: a slot_phi.safetensors for this model, or 'training-free' (default: the model's own)."),
    seed: int = typer.Option(1000, "--seed", help="First episode seed (default 1000: the default training run uses episode seeds 0..255); the storyboard seed is the same for every policy."),
    similar: bool = typer.Option(True, "--similar/--no-similar", help="Also run two-entity similar episodes (leakage)."),
    purity: bool = typer.Option(True, "--purity/--no-purity", help="Slot purity (ARI) on ground-truth clips."),
    past: str = typer.Option("generated", "--past", help="'generated': the model renders every chunk. 'truth': "
                             "ground truth up to the return, generated from there (isolates the memory; "
                             "scores the generated frames only)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every number as JSON."),
    png: Optional[Path] = typer.Option(None, "--png", help="Plot identity recall vs gap per policy."),
    world: str = typer.Option("standard", "--world", help="'standard' (the shape world) or 'sprites' (token-aligned "
                              "sprites; --gaps are frames of absence, multiples of 3, e.g. 3,9,18,27)."),
) -> None:
    """Identity persistence: exit-and-return episodes rendered with every policy on the same seeds and noise."""
    from slotgen.bench.identity import print_report, run_identity_bench, write_plot
    from slotgen.memory.registry import policy_names

    if world not in ("standard", "sprites"):
        raise SlotgenError(f"--world: expected standard or sprites, got {world!r}")

    names = policy_list(policies) if policies is not None else list(policy_names())
    try:
        gap_list = [int(g) for g in gaps.split(",") if g.strip()]
    except ValueError:
        raise SlotgenError(f"--gaps: expected frames like 12,36,72, got {gaps!r}") from None
    if not gap_list or any(g < 0 for g in gap_list):
        raise SlotgenError(f"--gaps: expected non-negative frame counts, got {gaps!r}")
    if episodes < 1:
        raise SlotgenError(f"--episodes must be at least 1, got {episodes}")
    if world == "sprites":
        from slotgen.bench.sprites import print_sprite_report, run_sprite_identity_bench

        if slot_phi is not None:
            raise SlotgenError("--slot-phi: the sprite world's models have no trained φ; leave it out with --world sprites")
        shown, on_item = _bench_progress("bench identity", None)
        with shown:
            result = run_sprite_identity_bench(names, gap_list, episodes, model=model, seed=seed, past=past,
                                               progress=on_item)
        print_sprite_report(result)
        if json_out is not None:
            import json as _json

            atomic_write_bytes(json_out, (_json.dumps(result, indent=2) + "\n").encode())
        return
    from slotgen.memory.phi_file import attach_phi
    from slotgen.models import load_model

    bundle = attach_phi(load_model(model), slot_phi)
    shown, on_item = _bench_progress("bench identity", None)
    with shown:
        result = run_identity_bench(names, gap_list, episodes, model=model, seed=seed, similar=similar, purity=purity,
                                    bundle=bundle, past=past, progress=on_item)
    print_report(result)
    if json_out is not None:
        import json as _json

        atomic_write_bytes(json_out, (_json.dumps(result, indent=2) + "\n").encode())
    if png is not None:
        write_plot(result, png)


@bench_app.command("narrative")
@user_errors
def bench_narrative(
    prompts: Path = typer.Argument(..., help="A storyboard (.yaml) or a LongLive prompt file (.jsonl, one narrative per line)."),
    policies: str = typer.Option("sink,slot", "--policies", help="Comma-separated memory specs (policy, optional @preset and :key=value), e.g. sink@longlive,slot@longlive:top_k=4."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated models, one per --policies entry (or one for all); default: the storyboard's."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds (1-8 or 1,4,9): the same for every setting."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Render through render-many on this Ray cluster (head host:6379); default: in this process."),
    scorer_dir: Optional[Path] = typer.Option(None, "--scorer-dir", help="Local CLIP and DINO (clip/, dino/ saved with save_pretrained) instead of the hub."),
    out: Path = typer.Option(Path("narrative-bench"), "--out", help="Folder for storyboards, videos, narrative.json and narrative.png (finished videos are reused)."),
    device: str = typer.Option("cpu", "--device", help="torch device for rendering and scoring."),
    window: float = typer.Option(10.0, "--window", help="Seconds per CLIP/consistency window."),
) -> None:
    """The paper's interactive evaluation: render a narrative under each memory setting with the same seeds,
    then CLIP text-video score per prompt segment and per window, VBench subject (DINO) and background (CLIP)
    consistency, with bootstrap intervals over seeds: a table, narrative.json and narrative.png."""
    from slotgen.bench.narrative import Setting, print_report, run_narrative_bench, write_plot
    from slotgen.farm import parse_seeds
    from slotgen.preflight import check_device

    dev = str(check_device(device))
    specs = memory_spec_list(policies)
    names = [m.strip() for m in models.split(",")] if models else [None]
    if len(names) == 1:
        names = names * len(specs)
    if len(names) != len(specs):
        raise SlotgenError(f"--models: {len(names)} models for {len(specs)} --policies entries; expected one or as many")
    if not math.isfinite(window) or window <= 0:
        raise SlotgenError(f"--window: expected seconds > 0, got {window}")
    settings = [Setting(s, m) for s, m in zip(specs, names)]
    if len({x.label for x in settings}) != len(settings):
        raise SlotgenError("--policies/--models: two settings are the same")
    result = run_narrative_bench(prompts, settings, parse_seeds(seeds), out, scorer_dir=scorer_dir, device=dev,
                                 ray_address=ray_address, window_seconds=window,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    write_plot(result, out / "narrative.png")
    print_report(result)
    print(f"wrote {out / 'narrative.json'} and {out / 'narrative.png'}")


@app.command("render-many")
@user_errors
def render_many_cmd(
    sources: list[str] = typer.Argument(..., help="Storyboards: files, folders (their *.yaml), globs ('season/*.yaml') or list files (.txt, one path per line)."),
    out_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder for the videos, their snapshots and manifest.json (shared storage on a cluster)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Sweep seeds: 1-8, 1,4,9 (default: each storyboard's seed)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Sweep memory policies: window,slot (default: each storyboard's memory)."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Join this Ray cluster (head host:6379, or ray://host:10001). Default: a local Ray instance on this machine."),
    ray_token_file: Optional[Path] = typer.Option(None, "--ray-token-file", help="The cluster's authentication token (a file; Ray 2.60 heads started with `ray start --head` use token authentication). Default: Ray's own RAY_AUTH_MODE/RAY_AUTH_TOKEN/RAY_AUTH_TOKEN_PATH."),
    cpus_per_job: float = typer.Option(1.0, "--cpus-per-job", help="Ray CPUs per job (also the torch threads of a worker)."),
    gpus_per_job: float = typer.Option(0.0, "--gpus-per-job", help="Ray GPUs per job (renders on cuda when > 0)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker actors (default: as many as the cluster's resources fit)."),
    local_cpus: Optional[int] = typer.Option(None, "--local-cpus", help="CPUs of the local Ray instance (default: all of this machine's)."),
    snapshot_every: str = typer.Option("60", "--snapshot-every", help="Each job's snapshot interval: SECONDS or Nc (chunks); a preempted job loses at most this much."),
    retries: int = typer.Option(3, "--retries", help="Restarts of a dead worker (and retries of its job, which resumes from its snapshot)."),
    fmt: str = typer.Option("mkv", "--format", help="mkv (lossless FFV1, bit-exact) or mp4."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device of the workers (default: cuda with --gpus-per-job, else cpu)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Render many storyboards (× --seeds × --memory) on a Ray cluster: one video per job, a manifest.json,
    jobs that resume from their snapshots when a worker dies. Ctrl-C stops cleanly (each job snapshots);
    rerunning the same command skips finished jobs and resumes the others. Exit 1 if a job failed.
    SIGTERM and SIGHUP (a closed terminal) stop like Ctrl-C."""
    from slotgen.farm import check_creatable, parse_seeds, plan_jobs, render_many, use_ray_token_file
    from slotgen.render import InterruptGuard, SnapshotEvery

    SnapshotEvery.parse(snapshot_every)
    if cpus_per_job <= 0 or gpus_per_job < 0:
        raise SlotgenError("--cpus-per-job must be > 0 and --gpus-per-job >= 0")
    policies = [p.strip() for p in memory.split(",") if p.strip()] if memory else None
    jobs = plan_jobs(sources, out_dir, seeds=parse_seeds(seeds) if seeds else None, policies=policies, fmt=fmt)
    check_creatable(out_dir)  # created once the cluster is joined: a failed --ray leaves nothing behind
    if ray_token_file is not None:
        use_ray_token_file(ray_token_file)
    for j in jobs:
        if Path(j.output).is_dir():
            raise SlotgenError(f"output path {j.output!r} is a directory")
    progress, on_update = _farm_progress(quiet, len(jobs))

    def on_job(row: dict) -> None:
        if quiet:
            return
        what = row["error"] if row["status"] == "failed" else f"{row['frames']} frames, {row['seconds']:.1f}s"
        line = f"{row['job']}: {row['status']} ({what})"
        (progress.console.print(line, markup=False, highlight=False) if progress is not None
         else print(line, file=sys.stderr, flush=True))

    def notice(signum: int) -> None:
        print("\nstopping: every running job finishes its chunk and writes its snapshot (again to abort; the last "
              "periodic snapshots stay)", file=sys.stderr, flush=True)

    try:
        with InterruptGuard(notice) as guard:
            if progress is not None:
                with progress:
                    report = render_many(jobs, out_dir, address=ray_address, cpus_per_job=cpus_per_job,
                                         gpus_per_job=gpus_per_job, workers=workers, device=device,
                                         snapshot_every=snapshot_every, max_retries=retries, local_cpus=local_cpus,
                                         on_update=on_update, on_job=on_job, should_stop=guard)
            else:
                report = render_many(jobs, out_dir, address=ray_address, cpus_per_job=cpus_per_job,
                                     gpus_per_job=gpus_per_job, workers=workers, device=device,
                                     snapshot_every=snapshot_every, max_retries=retries, local_cpus=local_cpus,
                                     on_job=on_job, should_stop=guard)
    except KeyboardInterrupt:
        print(f"interrupted: aborted; {out_dir / 'manifest.json'} and the periodic snapshots stay; rerun the same "
              f"command to resume", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # Ray's exit hooks, after a wait cut short, would end the process with status 1
    counts = report.counts()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    skipped = f" ({len(report.skipped)} already done, skipped)" if report.skipped else ""
    print(f"{summary}{skipped} in {report.elapsed:.1f}s; manifest {report.manifest}", file=sys.stderr)
    if report.interrupted:
        print("interrupted: rerun the same command to resume the unfinished jobs", file=sys.stderr)
        raise typer.Exit(130)
    if counts.get("failed"):
        raise typer.Exit(1)


def _farm_progress(quiet: bool, jobs: int):
    """render-many's rich display: frames over all jobs, jobs done/running/failed, cluster frames/s, ETA."""
    from rich.progress import BarColumn, Progress, TextColumn

    if quiet or not err_console.is_terminal:
        return None, None
    progress = Progress(TextColumn("[bold]jobs[/] {task.fields[jobs]}"), BarColumn(bar_width=24),
                        TextColumn("{task.completed:.0f}/{task.total:.0f} frames"),
                        TextColumn("{task.fields[fps]:.1f} frames/s"), TextColumn("ETA {task.fields[eta]}"),
                        console=err_console, transient=False)
    task = progress.add_task("farm", total=1, jobs="", fps=0.0, eta="-")

    def on_update(st) -> None:
        eta = "-" if st.eta is None else f"{int(st.eta) // 60}:{int(st.eta) % 60:02d}"
        progress.update(task, total=max(1, st.frames_total), completed=st.frames_done, fps=st.fps, eta=eta,
                        jobs=f"{st.done} done, {st.running} running, {st.failed} failed"
                             + (f", {st.skipped} skipped" if st.skipped else "") + f" of {st.jobs}")

    return progress, on_update


@app.command("pull")
@user_errors
def pull_cmd(
    name: Optional[str] = typer.Argument(None, help="self-forcing, longlive, memflow or wan-base."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where the model folder goes (default: $SLOTGEN_HOME/models, where --model NAME looks)."),
    list_: bool = typer.Option(False, "--list", help="Show what can be pulled, sizes, and what is already here."),
    force: bool = typer.Option(False, "--force", help="Download every file again, even when the Hugging Face cache has it (after a corrupt or truncated file)."),
) -> None:
    """Download a model folder from the Hugging Face Hub, verify it and install it atomically; then
    `slotgen render STORY.yaml --model NAME` finds it. Honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE; an
    interrupted pull resumes when run again (see docs/REAL_MODEL.md)."""
    from slotgen.models.pull import human_size, list_pullable, pull, render_hint

    if list_:
        from rich.table import Table

        table = Table(title="slotgen pull --list")
        for col in ("name", "what", "repositories", "size", "here"):
            table.add_column(col)
        for r in list_pullable(directory):
            size = f"{human_size(r['bytes'])} ({r['size_from']})" if r["bytes"] is not None else r["size_from"]
            table.add_row(r["name"], r["summary"], ", ".join(r["repos"]), size, r["folder"] or "not pulled")
        Console(width=200).print(table)
        return
    if name is None:
        raise SlotgenError("pull: name a model (slotgen pull --list shows them)")
    try:
        result = pull(name, directory, force=force, log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("interrupted: nothing was installed; run the same command to resume (finished and partial downloads "
              "stay in the Hugging Face cache)", file=sys.stderr)
        raise typer.Exit(130)
    for c in result.checks:
        print(f"verified: {c}", file=sys.stderr)
    if not result.sizes_checked:
        print("sizes were not compared with the hub (offline or unreachable)", file=sys.stderr)
    total = human_size(sum(max(0, f["size"]) for f in result.files))
    print(f"pulled {result.name} into {result.folder} ({len(result.files)} files, {total} in the Hugging Face cache)")
    print(f"next: {render_hint(result)}")


@app.command("live")
@user_errors
@with_memory_options(hidden=False)
def live_cmd(
    storyboard: Optional[Path] = typer.Argument(None, help="Start from this storyboard (its prompts play as scheduled until one is typed)."),
    out: Path = typer.Option(Path("live"), "--out", help="Folder for live.mp4, live.mkv (lossless), story.yaml and snapshot.pt."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on; anything but this machine needs --token."),
    port: int = typer.Option(8000, "--port", help="Port to serve on (0: any free port)."),
    token: Optional[str] = typer.Option(None, "--token", help="Required on every request and socket (?token=T or Authorization: Bearer T)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this snapshot live."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the model: 'miniature' or a local folder."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory policy: window, sink, bank, slot, or a registered plug-in."),
    realtime: bool = typer.Option(True, "--realtime/--no-realtime", help="Never run ahead of the wall clock by more than a chunk."),
    idle_stop: float = typer.Option(10.0, "--idle-stop", help="Stop this many seconds after the last page closes (0: never)."),
    snapshot_every: str = typer.Option("30", "--snapshot-every", help="Crash safety: every SECONDS (or Nc: every N chunks) seal the videos and write --out/snapshot.pt; 0 turns it off."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    **memory_keys,
) -> None:
    """Serve a local page that streams the story as it renders and takes the next prompt while it runs.

    Stop (the button, Ctrl-C, SIGTERM, or closing the page) leaves in --out the MP4, a lossless copy,
    story.yaml (each prompt where it took effect: `slotgen render` reproduces the frames) and snapshot.pt
    (`slotgen resume` continues it). See docs/LIVE.md.
    """
    from slotgen.live.server import run_live
    from slotgen.preflight import apply_cpu_threads, check_device
    from slotgen.render import SnapshotEvery
    from slotgen.storyboard import load_storyboard

    apply_cpu_threads(check_device(device), threads)
    sb = load_storyboard(storyboard) if storyboard is not None else None
    mem = None
    if memory is not None or any(v is not None for v in memory_keys.values()):
        from slotgen.storyboard import PromptSpan, Storyboard

        mem = memory_overrides(sb or Storyboard(duration=1, prompts=[PromptSpan(start=0, end=1, text="x")]),
                               memory, memory_keys)
    session = run_live(sb, out=out, host=host, port=port, token=token, resume=resume, model=model, memory=mem, device=device,
             realtime=realtime, idle_stop=idle_stop or None, snapshot_every=SnapshotEvery.parse(snapshot_every),
             print_line=lambda m: print(m, flush=True))
    if session.signalled is not None:
        raise typer.Exit(130)  # stopped by a signal: saved, like an interrupted render


def main() -> None:  # pragma: no cover - console entry
    if sys.argv[1:2] != ["pull"] and sys.argv[1:3] != ["bench", "narrative"]:
        # only `pull` (weights) and `bench narrative` (its scorers) may reach the hub; they honour HF_HUB_OFFLINE
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
