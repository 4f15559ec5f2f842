"""Every way of stopping every long command, as one matrix: SIGINT (Ctrl-C), a second SIGINT, SIGTERM,
SIGHUP (the terminal closed) and kill -9, for render, resume, render-many, train-miniature and
train-slots. Each row runs the real CLI in a subprocess, stops it at a known point (the
``SLOTGEN_DEBUG_*`` hooks hold it there), then checks the promise of docs/SNAPSHOTS.md: exit 130 (train-slots
after SIGTERM: 143; kill -9: killed), a playable output and a resumable snapshot or checkpoint (or, for a command that writes only at
its end, its input untouched), no hidden partial file, and the command that resumes it ends with the
result of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slotgen.snapshot import load_snapshot
from slotgen.video.writer import probe_video, read_video
from tests.ray_cluster import local_cluster
from tests.test_interrupt import STORY, TOTAL  # the same 4-second, two-prompt story

STOPS = ["SIGINT", "SIGINT-twice", "SIGTERM", "SIGHUP", "SIGKILL"]
COMMANDS = ["render", "resume", "render-many", "train-miniature", "train-slots"]
CAUGHT = 130
DEBUG = dict(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLOTGEN_DEBUG_CHUNKS="1")
TRAIN = ["--steps", "5", "--episodes", "2", "--batch", "2", "--clip-chunks", "2", "--checkpoint-every", "1",
         "--threads", "1", "--slot-steps", "2", "--slot-episodes", "2", "--quiet"]

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


# -- fixtures: references of uninterrupted runs, made once ------------------------------------------------

@pytest.fixture(scope="module")
def reference(miniature, tmp_path_factory):
    from slotgen.render import render
    from slotgen.storyboard import parse_storyboard

    out = tmp_path_factory.mktemp("ref") / "ref.mkv"
    render(parse_storyboard(STORY, "story.yaml"), out, bundle=miniature, snapshot_every=0)
    frames = read_video(out)
    assert len(frames) == TOTAL
    return frames


@pytest.fixture(scope="module")
def half(miniature, tmp_path_factory):
    """A render stopped after 2 chunks (the library's should_stop): the snapshot the resume rows continue."""
    from slotgen.render import render
    from slotgen.storyboard import parse_storyboard

    root = tmp_path_factory.mktemp("half")
    (root / "story.yaml").write_text(STORY)
    seen = []
    rep = render(parse_storyboard(STORY, str(root / "story.yaml")), root / "a.mkv", bundle=miniature,
                 snapshot=root / "a.pt", snapshot_every=0, on_chunk=seen.append, should_stop=lambda: len(seen) >= 2)
    assert rep.interrupted
    snap = load_snapshot(root / "a.pt")
    return root, snap.frames_emitted, snap.chunk


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The weights an uninterrupted train-miniature with the rows' settings writes."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = subprocess.run([sys.executable, "-m", "slotgen", "train-miniature", "--out", str(out), *TRAIN],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert res.returncode == 0, res.stderr
    return (out / "weights.safetensors").read_bytes()


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance (2 CPUs) the render-many rows join with --ray, started on first use."""
    pytest.importorskip("ray")
    yield from local_cluster()


# -- helpers -----------------------------------------------------------------------------------------------

def hidden(folder: Path) -> list[str]:
    """Hidden temporary files (partial writes, segments) left in ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if p.is_file())


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(proc: subprocess.Popen, stream, pattern: str, timeout: float = 240) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    for line in stream:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"{pattern!r} never came (exit {proc.wait()}): {''.join(lines)}")


def stop(proc: subprocess.Popen, how: str, group: bool = True) -> None:
    """Stop as a user would: Ctrl-C and a closed terminal signal the whole foreground process group, `kill`
    the process only."""
    def send(sig):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    if how == "SIGKILL":
        proc.kill()
    elif how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    elif how == "SIGINT-twice":
        send(signal.SIGINT)
        time.sleep(0.3)
        send(signal.SIGINT)
    else:
        send(getattr(signal, how))


def release(proc: subprocess.Popen) -> None:
    """Let a process held by a SLOTGEN_DEBUG_HOLD_* hook go on (it reads one line of stdin)."""
    try:
        proc.stdin.write("\n")
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass
    proc.stdin = None  # communicate() must not flush it again


def finish(proc: subprocess.Popen, how: str, before: list[str], code: int | None = None) -> str:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(before) + (err or "")
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, text
    else:
        assert proc.returncode == (CAUGHT if code is None else code), text
        assert "Traceback" not in text, text
    return text


def popen(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, **(DEBUG if env is None else env))  # now: the cluster fixture sets RAY_AUTH_MODE
    return subprocess.Popen([sys.executable, "-m", "slotgen", *args], cwd=cwd, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group, as a terminal's foreground job


def run(args: list[str], cwd: Path, monkeypatch) -> str:
    """The command that resumes, in this process (the CLI as typed; the miniature already loaded)."""
    from typer.testing import CliRunner

    from slotgen.cli import app

    monkeypatch.chdir(cwd)
    res = CliRunner().invoke(app, args)
    try:
        err = res.stderr
    except (ValueError, AttributeError):
        err = res.output
    assert res.exit_code == 0, (err, res.exception)
    return err


def printed_resume(text: str) -> list[str] | None:
    lines = [ln for ln in text.splitlines() if ln.startswith("resume with: ")]
    return shlex.split(lines[-1][len("resume with: "):])[1:] if lines else None


def check_video_stop(tmp_path: Path, video: str, snap_name: str, expected: np.ndarray, text: str, how: str) -> int:
    """After a stop: a playable video of whole chunks equal to the reference so far, a loadable snapshot at
    or before it, no hidden file (kill -9 and an abort keep the dead process's segment until the resume)."""
    frames = read_video(tmp_path / video)
    n = len(frames)
    assert 0 < n < len(expected) and np.array_equal(frames, expected[:n]), text
    snap = load_snapshot(tmp_path / snap_name)
    assert 0 < snap.frames_emitted <= n + len(expected) and not snap.complete, text
    if how in ("SIGINT", "SIGTERM", "SIGHUP"):
        assert snap.interrupted and hidden(tmp_path) == [], (hidden(tmp_path), text)
    return n


# -- the rows ----------------------------------------------------------------------------------------------

def row_render(how, tmp_path, request):
    reference = request.getfixturevalue("reference")
    (tmp_path / "story.yaml").write_text(STORY)
    args = ["render", "story.yaml", "-o", "out.mp4", "--lossless", "out.mkv", "--snapshot-every", "1c", "--quiet"]
    proc = popen(args, tmp_path, dict(DEBUG, SLOTGEN_DEBUG_HOLD_AFTER_CHUNK="1"))
    before = wait_for(proc, proc.stderr, r"^slotgen-chunk 1 ")  # chunk 0 checkpointed; held before chunk 1's
    stop(proc, how)
    release(proc)
    text = finish(proc, how, before)
    check_video_stop(tmp_path, "out.mkv", "out.mp4.snapshot.pt", reference, text, how)
    assert probe_video(tmp_path / "out.mp4")["frames"] > 0  # the MP4 plays too
    again = printed_resume(text) or ["resume", "out.mp4.snapshot.pt", "-o", "out.mp4", "--append", "--lossless",
                                     "out.mkv", "--snapshot", "out.mp4.snapshot.pt"]
    if how in ("SIGINT", "SIGTERM", "SIGHUP"):
        assert printed_resume(text) is not None, text
    run(again + ["--quiet"], tmp_path, request.getfixturevalue("monkeypatch"))
    assert np.array_equal(read_video(tmp_path / "out.mkv"), reference)
    assert probe_video(tmp_path / "out.mp4")["frames"] == TOTAL
    assert hidden(tmp_path) == []


def row_resume(how, tmp_path, request):
    reference = request.getfixturevalue("reference")
    root, first, chunk = request.getfixturevalue("half")
    args = ["resume", str(root / "a.pt"), "-o", "cont.mkv", "--snapshot-every", "1c", "--quiet"]
    proc = popen(args, tmp_path, dict(DEBUG, SLOTGEN_DEBUG_HOLD_AFTER_CHUNK=str(chunk + 1)))
    before = wait_for(proc, proc.stderr, rf"^slotgen-chunk {chunk + 1} ")
    stop(proc, how)
    release(proc)
    text = finish(proc, how, before)
    rest = reference[first:]
    check_video_stop(tmp_path, "cont.mkv", "cont.mkv.snapshot.pt", rest, text, how)
    again = printed_resume(text) or ["resume", "cont.mkv.snapshot.pt", "-o", "cont.mkv", "--append", "--snapshot",
                                     "cont.mkv.snapshot.pt"]
    run(again + ["--quiet"], tmp_path, request.getfixturevalue("monkeypatch"))
    assert np.array_equal(read_video(tmp_path / "cont.mkv"), rest)
    assert hidden(tmp_path) == []


def _live_hidden(folder: Path) -> list[str]:
    from slotgen.video.segments import _alive

    return [n for n in hidden(folder) if (m := re.search(r"(?:partial|segment)-(\d+)", n)) and _alive(int(m.group(1)))]


def row_render_many(how, tmp_path, request):
    reference = request.getfixturevalue("reference")
    address = request.getfixturevalue("cluster")
    (tmp_path / "s.yaml").write_text(STORY)
    args = ["render-many", "s.yaml", "-o", "out", "--ray", address, "--workers", "1", "--snapshot-every", "1c",
            "--quiet"]
    env = {k: v for k, v in DEBUG.items() if k != "SLOTGEN_DEBUG_CHUNKS"}
    proc = popen(args, tmp_path, env)
    out = tmp_path / "out"
    deadline = time.monotonic() + 240
    while not (out / "s.mkv.snapshot.pt").is_file():  # the job runs and has checkpointed once
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    stop(proc, how, group=False)  # the driver only: Ray's own processes are not in a terminal's group
    t0 = time.monotonic()
    text = finish(proc, how, [])
    if how != "SIGKILL":
        assert time.monotonic() - t0 < 30, text
    deadline = time.monotonic() + 60
    while _live_hidden(out):  # after kill -9 Ray ends the driver's worker on its own time
        assert time.monotonic() < deadline, hidden(out)
        time.sleep(0.2)
    row = {r["job"]: r for r in json.loads((out / "manifest.json").read_text())["jobs"]}["s"]
    if how != "SIGKILL":
        assert row["status"] == "interrupted", row
    if how in ("SIGINT", "SIGTERM", "SIGHUP"):
        assert hidden(out) == [] and "rerun the same command" in text, text
    frames = read_video(out / "s.mkv")  # playable, every frame right
    assert 0 < len(frames) < TOTAL and np.array_equal(frames, reference[:len(frames)])
    load_snapshot(out / "s.mkv.snapshot.pt")
    err = run(args, tmp_path, request.getfixturevalue("monkeypatch"))  # the same command resumes
    row = {r["job"]: r for r in json.loads((out / "manifest.json").read_text())["jobs"]}["s"]
    assert row["status"] == "done" and row["resumed_from"] > 0, (row, err)
    assert np.array_equal(read_video(out / "s.mkv"), reference)
    assert hidden(out) == []


def row_train_miniature(how, tmp_path, request):
    weights = request.getfixturevalue("trained")
    args = ["train-miniature", "--out", "run", *TRAIN]
    proc = popen(args, tmp_path, dict(DEBUG, SLOTGEN_DEBUG_HOLD_AFTER_STEP="2"))
    before = wait_for(proc, proc.stderr, r"^slotgen-step 2$")  # step 2 checkpointed, held there
    stop(proc, how)
    release(proc)
    text = finish(proc, how, before)
    import torch

    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2, text
    assert not (tmp_path / "run" / "weights.safetensors").exists()
    if how != "SIGKILL":
        assert hidden(tmp_path / "run") == [], hidden(tmp_path / "run")
    if how in ("SIGINT", "SIGTERM", "SIGHUP"):
        assert "resume with: slotgen train-miniature --out run --resume" in text, text
    run(["train-miniature", "--out", "run", "--resume", "--quiet"], tmp_path, request.getfixturevalue("monkeypatch"))
    assert (tmp_path / "run" / "weights.safetensors").read_bytes() == weights  # step for step
    assert hidden(tmp_path / "run") == [] and not (tmp_path / "run" / "checkpoint").exists()


SLOT_BOARD = """\
fps: 16
resolution: 32x32
sampler: {steps: 1}
seed: %d
memory: {policy: sink, sink: 2, window: 4}
duration: 0.75
prompts:
  - prompt: a red circle moves right on a blue background
"""
SLOTS = ["--storyboards", "boards", "--steps", "4", "--batch", "2", "--cells", "8", "--checkpoint-every", "1",
         "--threads", "1", "--quiet"]
SIGNALLED = {"SIGINT": 130, "SIGINT-twice": 130, "SIGTERM": 143, "SIGHUP": 130}  # train-slots: 128 + SIGTERM


def _slot_workdir(root: Path) -> Path:
    """A copy of the miniature's folder (``m``, φ goes into it) and two tiny storyboards (``boards``)."""
    import shutil

    import slotgen.models.miniature as mini

    shutil.copytree(Path(mini.__file__).parent / mini.ASSET_DIR, root / "m")
    (root / "boards").mkdir()
    for seed in (1, 2):
        (root / "boards" / f"b{seed}.yaml").write_text(SLOT_BOARD % seed)
    return root


def phi_content(path: Path) -> tuple[dict, dict]:
    """A φ file's tensors (raw bytes) and header; of the header's training record, the wall-clock
    ``seconds`` and the ``command`` as typed (a resume adds --resume) are the only fields that may differ."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
        meta = dict(f.metadata())
    config = json.loads(meta.pop("config"))
    return tensors, dict(meta, config={k: v for k, v in config.items() if k not in ("seconds", "command")})


@pytest.fixture(scope="module")
def slot_phi(tmp_path_factory):
    """The φ an uninterrupted unsupervised train-slots with the row's settings writes."""
    root = _slot_workdir(tmp_path_factory.mktemp("slotref"))
    res = subprocess.run([sys.executable, "-m", "slotgen", "train-slots", "--model", "m", *SLOTS], cwd=root,
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert res.returncode == 0, res.stderr
    assert not (root / "m" / "slot_phi.checkpoint.pt").exists()
    return phi_content(root / "m" / "slot_phi.safetensors")


def row_train_slots(how, tmp_path, request):
    from slotgen.train.slots_unsup import load_checkpoint

    reference = request.getfixturevalue("slot_phi")
    _slot_workdir(tmp_path)
    folder, ckpt = tmp_path / "m", tmp_path / "m" / "slot_phi.checkpoint.pt"
    shipped = digest(folder)
    args = ["train-slots", "--model", "m", *SLOTS]
    proc = popen(args, tmp_path, dict(DEBUG, SLOTGEN_DEBUG_HOLD_AFTER_STEP="2"))
    before = wait_for(proc, proc.stderr, r"^slotgen-step 2$")  # keys collected, step 2 checkpointed, held there
    stop(proc, how)
    release(proc)
    text = finish(proc, how, before, SIGNALLED.get(how))
    state = load_checkpoint(ckpt)  # loadable; the step the run was held at (kill -9: the periodic one)
    assert state.step == 2 and state.done == 2 and len(state.chunks) > 0, text
    left = digest(folder)
    assert left.pop(ckpt.name) and left == shipped, text  # the folder's files (its shipped φ too) byte-identical
    if how != "SIGKILL":
        assert hidden(tmp_path) == [], (hidden(tmp_path), text)
        assert f"resume with: slotgen train-slots --model m {' '.join(SLOTS)} --resume" in text, text
    run(args + ["--resume"], tmp_path, request.getfixturevalue("monkeypatch"))
    assert phi_content(folder / "slot_phi.safetensors") == reference  # step for step: the uninterrupted φ
    assert not ckpt.exists() and hidden(tmp_path) == []


ROWS = {"render": row_render, "resume": row_resume, "render-many": row_render_many,
        "train-miniature": row_train_miniature, "train-slots": row_train_slots}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.replace("-", "_"))  # -k train_slots
def test_every_stop_of_every_long_command_leaves_a_resumable_state(command, how, tmp_path, request):
    ROWS[command](how, tmp_path, request)
