"""Render many storyboards on a Ray cluster, every job preemptible (``slotgen render-many``).

A *job* is one storyboard with one seed and one memory policy; it writes one lossless video
``<out>/<job>.mkv`` (or ``.mp4``) and keeps its snapshot beside it, ``<out>/<job>.mkv.snapshot.pt``.
:func:`plan_jobs` expands storyboards (a folder, a glob, a list file) × seeds × policies into jobs.

:func:`render_many` runs them on Ray (https://docs.ray.io): a pool of :class:`RenderWorker` actors,
each holding the loaded model bundles it has used (weights load once per worker process, not once
per job) and asking Ray for ``cpus_per_job``/``gpus_per_job``. Each job renders with periodic
snapshots (``snapshot_every``, see docs/SNAPSHOTS.md). The actors are created with
``max_restarts``/``max_task_retries``: when a worker process dies (preemption, OOM, ``kill -9``) Ray
restarts it and calls the job again, and the job *resumes* from its newest snapshot, so the finished
video is bit-identical to an uninterrupted render. A job that fails (a storyboard error, a model that
does not load) fails alone, with a one-line error in the manifest.

The manifest ``<out>/manifest.json`` (written atomically after every change) has one row per job:
job, storyboard, seed, policy, output, frames, seconds, status (pending, running, done, failed,
interrupted), error, plus worker and resumed_from. A stop (``should_stop``: Ctrl-C in the CLI) asks
every worker to finish its current chunk and snapshot; a later run of the same jobs skips the done
ones and resumes the others.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from slotgen.atomic import atomic_write_bytes
from slotgen.errors import SlotgenError
from slotgen.snapshot import default_snapshot_path

MANIFEST = "manifest.json"
STORYBOARD_SUFFIXES = (".yaml", ".yml")
DEFAULT_FARM_SNAPSHOT_EVERY = "60"
"""Seconds between a job's snapshots unless told otherwise: a preempted job loses at most this much."""


# ----------------------------------------------------------------------------------------------------
# Planning: storyboards × seeds × policies → jobs


@dataclass(frozen=True)
class FarmJob:
    """One render: a storyboard file, optionally with its seed and memory policy replaced."""

    name: str  # unique in the run: the output's stem and the manifest key
    storyboard: str  # absolute path
    seed: int | None  # None: the storyboard's own
    policy: str | None  # None: the storyboard's own memory section
    output: str  # absolute path of the video

    @property
    def snapshot(self) -> str:
        return str(default_snapshot_path(self.output))


def parse_seeds(text: str) -> list[int]:
    """``"1-8"``, ``"1,4,9"``, ``"1-3,10"`` → the seeds, in order, without repeats."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                values = range(a, b + 1)
            else:
                values = [int(part)]
        except ValueError:
            raise SlotgenError(f"--seeds: expected seeds like 1-8 or 1,4,9, got {text!r}") from None
        seeds += [v for v in values if v not in seeds]
    return seeds


def collect_storyboards(sources: list[str | Path]) -> list[Path]:
    """Storyboard files named by ``sources``: a folder (its ``*.yaml``/``*.yml``), a glob, a list file
    (``.txt``/``.list``: one path per line, relative to the list, ``#`` comments) or a storyboard."""
    found: list[Path] = []
    for src in sources:
        text = str(src)
        path = Path(text).expanduser()
        if path.is_dir():
            items = sorted(p for p in path.iterdir() if p.suffix.lower() in STORYBOARD_SUFFIXES and p.is_file())
            if not items:
                raise SlotgenError(f"folder {text!r} holds no storyboards (*.yaml, *.yml)")
        elif path.is_file() and path.suffix.lower() in (".txt", ".list"):
            items = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                p = Path(line).expanduser()
                p = p if p.is_absolute() else path.parent / p
                if not p.is_file():
                    raise SlotgenError(f"{text}:{n}: storyboard {line!r} does not exist")
                items.append(p)
        elif path.is_file():
            items = [path]
        elif any(c in text for c in "*?["):
            items = sorted(Path(p) for p in _glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
            if not items:
                raise SlotgenError(f"glob {text!r} matches no files")
        else:
            raise SlotgenError(f"{text!r} is neither a storyboard, a folder, a list file nor a glob that matches")
        for p in items:
            p = p.resolve()
            if p not in found:
                found.append(p)
    return found


def plan_jobs(sources: list[str | Path], out_dir: str | Path, *, seeds: list[int] | None = None,
              policies: list[str] | None = None, fmt: str = "mkv") -> list[FarmJob]:
    """Every storyboard × seed × policy, named ``<stem>[-seed<N>][-<policy>]``, output in ``out_dir``."""
    from slotgen.memory.registry import policy_names

    if fmt not in ("mkv", "mp4"):
        raise SlotgenError(f"--format: expected mkv (lossless) or mp4, got {fmt!r}")
    known = policy_names()
    for p in policies or []:
        if p not in known:
            raise SlotgenError(f"--memory: unknown policy {p!r}; expected one of {', '.join(known)}")
    out = Path(out_dir).resolve()
    jobs: list[FarmJob] = []
    stems: dict[str, Path] = {}
    for sb in collect_storyboards(sources):
        if sb.stem in stems:
            raise SlotgenError(f"two storyboards are named {sb.stem!r} ({stems[sb.stem]} and {sb}); their outputs "
                               f"would collide in {out}")
        stems[sb.stem] = sb
        for seed in seeds or [None]:
            for policy in policies or [None]:
                name = sb.stem + ("" if seed is None else f"-seed{seed}") + ("" if policy is None else f"-{policy}")
                jobs.append(FarmJob(name, str(sb), seed, policy, str(out / f"{name}.{fmt}")))
    return jobs


def job_storyboard(job: FarmJob):
    """The job's storyboard with its seed and policy applied (a new policy starts from its defaults)."""
    from slotgen.memory.registry import parse_memory_config
    from slotgen.storyboard import load_storyboard

    sb = load_storyboard(job.storyboard)
    overrides: dict = {}
    if job.seed is not None:
        overrides["seed"] = job.seed
    if job.policy is not None and job.policy != sb.memory.policy:
        overrides["memory"] = parse_memory_config({"policy": job.policy})
    return sb.with_overrides(**overrides) if overrides else sb


# ----------------------------------------------------------------------------------------------------
# The manifest


ROW_KEYS = ("job", "storyboard", "seed", "policy", "output", "frames", "seconds", "status", "error", "worker",
            "resumed_from")


class Manifest:
    """``<out>/manifest.json``: one row per job, rewritten atomically on every change."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / MANIFEST
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                self.rows = {r["job"]: r for r in doc["jobs"]}
            except (ValueError, KeyError, TypeError):
                raise SlotgenError(f"{self.path}: not a slotgen render-many manifest (remove it or pick another "
                                   f"output folder)") from None

    def update(self, job: FarmJob, **values) -> dict:
        row = self.rows.setdefault(job.name, {k: None for k in ROW_KEYS})
        row.update(job=job.name, storyboard=job.storyboard, output=job.output)
        row.update(values)
        return row

    def write(self) -> None:
        doc = {"format": "slotgen-render-many", "version": 1, "jobs": list(self.rows.values())}
        atomic_write_bytes(self.path, (json.dumps(doc, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------------
# The worker (a Ray actor; a plain class so it can be tested and used without Ray)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, SlotgenError) else f"{type(e).__name__}: {text}"[:300]


class RenderWorker:
    """Renders jobs one after another with the model bundles it has loaded (one load per model spec).

    Meant to run as a Ray actor with ``max_concurrency`` > 1, so :meth:`progress` and :meth:`stop` are
    answered while :meth:`run` renders.
    """

    def __init__(self, device: str = "cpu", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = device
        self.bundles: dict[str, object] = {}
        self.loads = 0  # model loads by this process (the test counts them)
        self.jobs = 0
        self._stop = threading.Event()
        self._progress: dict = {}

    def bundle(self, spec: str):
        from slotgen.models import load_model

        if spec not in self.bundles:
            self.bundles[spec] = load_model(spec, device=self.device)
            self.loads += 1
        return self.bundles[spec]

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": _node(), "loads": self.loads, "jobs": self.jobs}

    def progress(self) -> dict:
        return dict(self._progress, pid=os.getpid())

    def stop(self) -> None:
        self._stop.set()

    def run(self, job: FarmJob, snapshot_every: str | float | None = DEFAULT_FARM_SNAPSHOT_EVERY) -> dict:
        """Render ``job`` (resuming its snapshot when one of the same storyboard exists); never raises for a
        job's own failure: returns the manifest values (status done/interrupted/failed, error line)."""
        from slotgen.render import render, resolved_storyboard, tokens_per_frame
        from slotgen.resume import resume
        from slotgen.snapshot import load_snapshot
        from slotgen.video.segments import complete_joins

        t0 = time.perf_counter()
        self.jobs += 1
        worker = f"{_node()}:{os.getpid()}"
        self._progress = {"job": job.name, "frames": 0, "new_frames": 0, "total": 0}  # resumed_from: once known
        resumed_from = 0
        try:
            sb = job_storyboard(job)
            self._progress["total"] = sb.total_frames
            snap = None
            bundle = self.bundle(sb.model)
            if Path(job.snapshot).is_file() and Path(job.output).is_file():
                snap = load_snapshot(job.snapshot)
                # snapshots hold the storyboard as rendered, its memory resolved under the model's preset
                if snap.storyboard_yaml != resolved_storyboard(sb, bundle.settings.preset,
                                                                             tokens_per_frame(bundle)).to_yaml():
                    snap = None  # the storyboard (or seed/policy) changed since: start over
            start = snap.frames_emitted if snap is not None else 0
            self._progress.update(frames=start, resumed_from=start)

            def on_chunk(ev) -> None:
                self._progress.update(frames=ev.frames_done, new_frames=ev.frames_done - start)

            kw = dict(on_chunk=on_chunk, should_stop=self._stop.is_set, snapshot_every=snapshot_every)
            if snap is not None and snap.complete and not snap.interrupted:
                complete_joins(snap.video.get("joins", []))  # finished before the manifest said so
                frames, interrupted = snap.frames_emitted, False
            elif snap is not None:
                resumed_from = snap.frames_emitted
                report = resume(snap, job.output, append=True, bundle=bundle, snapshot_out=job.snapshot, **kw)
                frames, interrupted = report.first_frame + report.frames, report.interrupted
            else:
                report = render(sb, job.output, bundle=bundle, snapshot=job.snapshot, **kw)
                frames, interrupted = report.frames, report.interrupted
            status, error = ("interrupted" if interrupted else "done"), None
        except Exception as e:  # noqa: BLE001 - a job fails alone, with its one-line reason
            status, error, frames = "failed", _one_line(e), None
        return {"status": status, "error": error, "frames": frames, "seconds": round(time.perf_counter() - t0, 3),
                "worker": worker, "resumed_from": resumed_from}


def _node() -> str:
    import socket

    return socket.gethostname()


# ----------------------------------------------------------------------------------------------------
# The driver


@dataclass
class FarmStatus:
    """What the progress display shows, after every poll."""

    jobs: int
    done: int
    failed: int
    running: int
    skipped: int
    frames_done: int  # frames of the story rendered so far, over the jobs of this run
    frames_total: int
    frames_new: int  # frames rendered by this run (what the rate counts)
    elapsed: float
    running_jobs: dict = field(default_factory=dict)  # job name → worker progress (pid, frames, total)

    @property
    def fps(self) -> float:
        return self.frames_new / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        fps = self.fps
        return (self.frames_total - self.frames_done) / fps if fps > 0 else None


@dataclass
class FarmReport:
    rows: list[dict]
    skipped: list[str]
    interrupted: bool
    workers: list[dict]  # RenderWorker.info() of every worker at the end
    elapsed: float
    manifest: str

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def ray_endpoint(address: str) -> tuple[str, int]:
    """``host:6379`` / ``ray://host:10001`` / ``host`` → (host, port): where a Ray address is reached (the
    GCS port, 6379 when none is given; the Ray Client port, 10001, for ``ray://``)."""
    from urllib.parse import urlsplit

    text = address.strip()
    client = text.startswith("ray://")
    try:
        parts = urlsplit(text if "://" in text else f"gcs://{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host:
        raise SlotgenError(f"--ray {address!r}: expected HOST:PORT (the head's GCS port, e.g. head-node:6379) or "
                           f"ray://HOST:10001")
    return host, port or (10001 if client else 6379)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail within ``timeout`` seconds, with one line naming ``address`` as given, when nothing accepts a
    connection there (Ray itself retries an absent head for minutes, ignoring Ctrl-C)."""
    import socket

    host, port = ray_endpoint(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror:
        raise SlotgenError(f"--ray {address}: unknown host {host!r}") from None
    except (TimeoutError, socket.timeout):
        raise SlotgenError(f"--ray {address}: no answer from {host}:{port} within {timeout:g} s; is the head "
                           f"running (`ray start --head`) and the port open?") from None
    except OSError as e:
        why = (e.strerror or str(e)).lower()
        raise SlotgenError(f"--ray {address}: cannot connect to {host}:{port} ({why}); is the head running "
                           f"(`ray start --head`)?") from None


class _signal_handlers_kept:
    """``ray.init`` replaces the process's SIGTERM handler (with one that exits, or that kills the local
    instance and exits): the caller's SIGINT/SIGTERM/SIGHUP handlers are put back afterwards, so a
    SIGTERM stops the run like Ctrl-C instead of tearing Ray down under it."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __enter__(self):
        self.saved = ({s: signal.getsignal(s) for s in self.SIGNALS}
                      if threading.current_thread() is threading.main_thread() else {})
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.saved.items():
            if handler is not None:
                signal.signal(s, handler)


class _signals_end_the_connection:
    """While ``ray.init`` connects (its C++ core holds the main thread, so Python's handlers cannot run for
    as long as it retries), SIGINT/SIGTERM/SIGHUP are blocked in this thread and the threads Ray starts, and
    taken by a watchdog thread instead: a signal then ends the process at once, exit 130, with one line
    naming ``address`` (nothing has been written yet). Afterwards the signals go to their handlers again."""

    def __init__(self, address: str):
        self.address = address
        self.signals = {s for s in _signal_handlers_kept.SIGNALS}
        self.done = threading.Event()

    def _watch(self) -> None:
        while not self.done.is_set():
            info = signal.sigtimedwait(self.signals, 0.1)
            if info is not None and not self.done.is_set():
                try:
                    os.write(self.stderr, f"interrupted ({signal.Signals(info.si_signo).name}) while joining the Ray "
                                          f"cluster at {self.address}: nothing was written\n".encode())
                except OSError:
                    pass
                os._exit(130)

    def __enter__(self):
        self.on = (hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait")
                   and threading.current_thread() is threading.main_thread())
        if self.on:
            self.stderr = os.dup(2)  # the terminal, even while fd 2 is captured
            signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
            self.thread = threading.Thread(target=self._watch, name="slotgen-ray-connect", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self.done.set()
            self.thread.join()
            os.close(self.stderr)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)  # a signal pending now reaches its handler


class _stderr_captured:
    """fd 2 to a temporary file (Ray's C++ core prints its connection retries there, line after line);
    :attr:`text` holds what was written; lines that are not Ray's own log go back to stderr."""

    RAY_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [A-Z] \d+ \d+\] ")

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(prefix="slotgen-ray-")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        import sys

        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        for line in self.text.splitlines():
            if line.strip() and not self.RAY_LOG.match(line) and "SIGTERM handler is not set" not in line:
                print(line, file=sys.stderr)


AUTH_HELP = ("pass the head's token (on the head: ~/.ray/auth_token, or `ray get-auth-token`) with --ray-token-file "
             "FILE, or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see docs/SCALE_OUT.md)")


def check_creatable(folder: str | Path, option: str = "--output-dir") -> None:
    """One line now, before any work, when ``folder`` cannot be created or written; creates nothing."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SlotgenError(f"{option} {str(folder)!r}: is a file, expected a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SlotgenError(f"{option} {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SlotgenError(f"{option} {str(folder)!r}: {str(existing)!r} is not writable (permission denied or "
                           f"read-only)")


def use_ray_token_file(path: str | Path) -> None:
    """Make this process (and the Ray workers it starts) present the token in ``path`` to a Ray cluster
    with token authentication (Ray 2.60 reads ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``)."""
    p = Path(path).expanduser()
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise SlotgenError(f"--ray-token-file {str(path)!r}: {(e.strerror or str(e)).lower()}") from None
    if not token:
        raise SlotgenError(f"--ray-token-file {str(path)!r}: the file is empty (expected the cluster's token)")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(p.resolve())
    os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray prefers RAY_AUTH_TOKEN over the path: the file given wins


def ray_init(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 128) -> bool:
    """Connect to ``address`` (a running cluster: ``host:6379`` or ``ray://host:10001``), or start a small
    local instance: no dashboard, a ``object_store_mb`` object store (jobs exchange only small dicts).
    Returns True when this call started the connection (the caller shuts it down).

    An address where nothing listens fails at once (:func:`check_reachable`), a refused token or another
    failed connection in one line naming ``address``; the caller's signal handlers stay installed."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    if address:
        check_reachable(address)
        with _signal_handlers_kept(), _signals_end_the_connection(address), _stderr_captured() as log:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                return True
            except Exception as e:  # noqa: BLE001 - Ray's many ways of failing to connect: one line each
                failure = e
        if "InvalidAuthToken" in log.text or "Unauthenticated" in log.text or \
                type(failure).__name__ == "AuthenticationError":
            raise SlotgenError(f"--ray {address}: the cluster refused this process's authentication token; "
                               f"{AUTH_HELP}") from None
        from slotgen.errors import one_line

        raise SlotgenError(f"--ray {address}: cannot join the Ray cluster ({one_line(failure, 160)})") from None
    with _signal_handlers_kept():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=object_store_mb * 2**20, log_to_driver=False)
    return True


def render_many(jobs: list[FarmJob], out_dir: str | Path, *, address: str | None = None, cpus_per_job: float = 1,
                gpus_per_job: float = 0, workers: int | None = None, device: str | None = None,
                snapshot_every: str | float | None = DEFAULT_FARM_SNAPSHOT_EVERY, max_retries: int = 3,
                local_cpus: int | None = None, on_update: Callable[[FarmStatus], None] | None = None,
                on_job: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None, poll: float = 0.5) -> FarmReport:
    """Render ``jobs`` on Ray (``address``, else the Ray already initialised in this process, else a local
    instance of ``local_cpus`` CPUs), writing ``out_dir/manifest.json`` as they finish. Jobs whose row
    says done and whose output exists are skipped. ``on_update`` gets a :class:`FarmStatus` after every
    poll, ``on_job`` each manifest row as its job ends. See the module docstring."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    out = Path(out_dir)
    manifest = Manifest(out)
    t0 = time.perf_counter()
    skipped: list[str] = []
    todo: list[FarmJob] = []
    totals: dict[str, int] = {}
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise SlotgenError("two jobs have the same name")
    for job in jobs:
        row = manifest.rows.get(job.name)
        if row and row.get("status") == "done" and Path(job.output).is_file():
            skipped.append(job.name)
            continue
        try:  # a broken storyboard fails here, before any worker starts
            sb = job_storyboard(job)
        except SlotgenError as e:
            row = manifest.update(job, seed=job.seed, policy=job.policy, status="failed", error=_one_line(e),
                                  frames=None, seconds=0.0)
            if on_job is not None:
                on_job(row)
            continue
        totals[job.name] = sb.total_frames
        manifest.update(job, seed=sb.seed, policy=sb.memory.policy, status="pending", error=None)
        todo.append(job)
    # connect first: an unreachable cluster or a refused token leaves nothing behind (no folder, no manifest)
    started = ray_init(address, num_cpus=local_cpus) if todo else False
    try:
        out.mkdir(parents=True, exist_ok=True)
        manifest.write()
    except BaseException:
        if started:
            ray.shutdown()
        raise
    actors: list = []
    idle: list = []
    inflight: dict = {}  # ObjectRef → (actor, job)
    busy: dict = {}  # actor → job
    progress: dict[str, dict] = {}
    finished_frames: dict[str, int] = {}
    new_frames_done = 0
    stopping = False
    infos: list[dict] = []
    prior_seconds = {j.name: float(manifest.rows[j.name].get("seconds") or 0.0) for j in todo}
    try:
        if todo:
            resources = ray.cluster_resources()
            fits = int(resources.get("CPU", 1) // cpus_per_job) if cpus_per_job > 0 else len(todo)
            if gpus_per_job > 0:
                fits = min(fits, int(resources.get("GPU", 0) // gpus_per_job))
                if fits == 0:
                    raise SlotgenError(f"--gpus-per-job {gpus_per_job}: the Ray cluster has {resources.get('GPU', 0)} GPUs")
            n = max(1, min(len(todo), workers or fits or 1))
            actor_cls = ray.remote(RenderWorker).options(
                num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_restarts=max_retries,
                max_task_retries=max_retries, max_concurrency=4)
            dev = device or ("cuda" if gpus_per_job > 0 else "cpu")
            actors = [actor_cls.remote(device=dev, threads=int(max(1, cpus_per_job))) for _ in range(n)]
            idle = list(actors)
        queue = list(todo)
        pending_progress: dict = {}
        while queue or inflight:
            if should_stop is not None and should_stop() and not stopping:
                stopping = True
                for a in actors:
                    a.stop.remote()
            while queue and idle and not stopping:
                actor, job = idle.pop(0), queue.pop(0)
                ref = actor.run.remote(job, snapshot_every)
                inflight[ref] = (actor, job)
                busy[actor] = job
                manifest.update(job, status="running")
                manifest.write()
            if stopping and not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=poll)
            for ref in ready:
                actor, job = inflight.pop(ref)
                busy.pop(actor, None)
                try:
                    result = ray.get(ref)
                    idle.append(actor)
                except (RayActorError, RayTaskError) as e:  # the worker died more often than max_retries
                    result = {"status": "failed", "frames": None, "seconds": 0.0, "resumed_from": None,
                              "error": f"worker lost after {max_retries} retries: {_one_line(e)[:200]}"}
                    ray.kill(actor)
                    actors.remove(actor)
                    fresh = actor_cls.remote(device=dev, threads=int(max(1, cpus_per_job)))  # the queue goes on
                    actors.append(fresh)
                    idle.append(fresh)
                result["seconds"] = round(prior_seconds.get(job.name, 0.0) + float(result["seconds"]), 3)
                row = manifest.update(job, **result)
                manifest.write()
                if on_job is not None:
                    on_job(row)
                last = progress.pop(job.name, {})
                new_frames_done += int(last.get("new_frames", 0))
                if result["status"] == "done":
                    finished_frames[job.name] = totals[job.name]
                    new_frames_done += max(0, totals[job.name] - int(last.get("frames", 0)))
            # progress of the running jobs (actors answer while rendering: max_concurrency > 1)
            for actor in list(busy):
                if actor not in pending_progress:
                    pending_progress[actor] = actor.progress.remote()
            if pending_progress:
                got, _ = ray.wait(list(pending_progress.values()), num_returns=len(pending_progress), timeout=0.05)
                for actor, ref in list(pending_progress.items()):
                    if ref in got:
                        del pending_progress[actor]
                        try:
                            p = ray.get(ref)
                        except (RayActorError, RayTaskError):
                            continue
                        if actor in busy and p.get("job") == busy[actor].name:
                            progress[p["job"]] = p
            if on_update is not None:
                rows = [manifest.rows[j.name] for j in jobs if j.name in manifest.rows]
                frames_done = sum(finished_frames.values()) + sum(int(p.get("frames", 0)) for p in progress.values())
                on_update(FarmStatus(
                    jobs=len(jobs), done=sum(r["status"] == "done" for r in rows) - len(skipped),
                    failed=sum(r["status"] == "failed" for r in rows), running=len(inflight), skipped=len(skipped),
                    frames_done=frames_done, frames_total=sum(totals.values()),
                    frames_new=new_frames_done + sum(int(p.get("new_frames", 0)) for p in progress.values()),
                    elapsed=time.perf_counter() - t0, running_jobs=dict(progress)))
        for job in todo:
            if manifest.rows[job.name]["status"] in ("pending", "running"):
                manifest.update(job, status="pending")
        manifest.write()
        if actors:
            infos = [i for i in _gather([a.info.remote() for a in actors]) if i is not None]
    except KeyboardInterrupt:  # a second Ctrl-C: abort; the rows say what a rerun resumes
        for job in todo:
            if manifest.rows[job.name]["status"] == "running":
                manifest.update(job, status="interrupted")
        manifest.write()
        raise
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    rows = [manifest.rows[j.name] for j in jobs if j.name in manifest.rows]
    return FarmReport(rows=rows, skipped=skipped, interrupted=stopping, workers=infos,
                      elapsed=time.perf_counter() - t0, manifest=str(manifest.path))


def _gather(refs: list, timeout: float = 10.0) -> list:
    import ray

    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=timeout))
        except Exception:  # noqa: BLE001 - a dead or hung worker has no info
            out.append(None)
    return out
