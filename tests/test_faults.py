"""Fault injection: kill -9 at seeded random chunks, a crash between a snapshot and its video join, full
disks and read-only targets, ffmpeg dying mid-write, and hostile command lines. Each case proves: no
traceback, no input destroyed, and the newest complete snapshot resumes bit-exactly (frames compared
on the lossless .mkv against an uninterrupted render)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from slotgen.snapshot import default_snapshot_path, load_snapshot
from slotgen.video.writer import read_video

POLICIES = {
    "window": "{policy: window, window: 4}",
    "sink": "{policy: sink, sink: 2, window: 4}",
    "bank": "{policy: bank, window: 3, sink: 1, bank_frames: 2}",
    "slot": "{policy: slot}",
}


def story(policy: str) -> str:
    return textwrap.dedent(f"""\
        fps: 16
        resolution: 32x32
        sampler: {{steps: 2}}
        seed: 5
        memory: {POLICIES[policy]}
        duration: 3
        prompts:
          - prompt: a red circle moves right on a blue background
          - at: 1.5
            prompt: a green square enters from the left on a white background
        """)


def slotgen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "slotgen", *args]


def run_cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(slotgen_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted lossless renders, one per policy (computed lazily)."""
    cache: dict[str, np.ndarray] = {}
    root = tmp_path_factory.mktemp("refs")

    def get(policy: str) -> np.ndarray:
        if policy not in cache:
            d = root / policy
            d.mkdir()
            (d / "story.yaml").write_text(story(policy))
            res = run_cli(d, "render", "story.yaml", "-o", "ref.mkv", "-q", "--snapshot-every", "0")
            assert res.returncode == 0, res.stderr
            cache[policy] = read_video(d / "ref.mkv")
        return cache[policy]

    return get


def kill_at_chunk(cwd: Path, chunk: int, extra: tuple[str, ...] = ()) -> str:
    """Start a render that snapshots after every chunk and SIGKILL it once chunk ``chunk`` is reported
    (the kill lands somewhere in that chunk's checkpoint or the next chunk's generation)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SLOTGEN_DEBUG_CHUNKS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(slotgen_cmd("render", "story.yaml", "-o", "out.mp4", "--lossless", "out.mkv", "-q",
                                        "--snapshot-every", "1c", *extra),
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(f"slotgen-chunk {chunk} "):
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(lines)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines)


def resume_everything(cwd: Path) -> subprocess.CompletedProcess:
    """The documented command that continues every output after a crash."""
    return run_cli(cwd, "resume", "out.mp4.snapshot.pt", "-o", "out.mp4", "--append", "--lossless", "out.mkv",
                   "--snapshot", "out.mp4.snapshot.pt", "-q")


def assert_resumes_exactly(cwd: Path, reference: np.ndarray) -> int:
    """Resume the newest snapshot in place; the whole lossless video equals the reference. Returns the
    frames the snapshot held (what survived the crash)."""
    snap = load_snapshot(cwd / "out.mp4.snapshot.pt")
    held = snap.frames_emitted
    res = resume_everything(cwd)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    frames = read_video(cwd / "out.mkv")
    assert len(frames) == len(reference) and np.array_equal(frames, reference)
    assert len(read_video(cwd / "out.mp4")) == len(reference)
    assert hidden_files(cwd) == [], hidden_files(cwd)  # the dead process's leftovers were cleaned up
    assert (cwd / "story.yaml").read_text().startswith("fps: 16")  # the input is untouched
    return held


# seeded choice of kill points: >= 10 across the four policies
_RNG = random.Random(18)
KILL_POINTS = [(policy, _RNG.randrange(1, 15)) for policy in POLICIES for _ in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("policy,chunk", KILL_POINTS, ids=[f"{p}-chunk{c}" for p, c in KILL_POINTS])
def test_sigkill_mid_render_loses_at_most_the_interval_and_resumes_bit_exactly(policy, chunk, tmp_path, references):
    (tmp_path / "story.yaml").write_text(story(policy))
    log = kill_at_chunk(tmp_path, chunk)
    assert "Traceback" not in log
    snap_path = tmp_path / "out.mp4.snapshot.pt"
    assert snap_path.is_file(), (log, hidden_files(tmp_path))  # snapshots after every chunk: one exists
    held = assert_resumes_exactly(tmp_path, references(policy))
    # the kill came after chunk `chunk` was reported: at most that chunk and the one in flight are lost
    from slotgen.engine.generator import ChunkGeometry
    from slotgen.models import load_model

    s = load_model("miniature").settings
    geo = ChunkGeometry(s.chunk_frames, s.vae_stride_t)
    assert held >= geo.first_frame(chunk), (held, chunk)


CRASH_AFTER_SNAPSHOT = """\
import os, sys
import slotgen.video.segments as seg
calls = {"n": 0}
nth = int(sys.argv[1])
real = seg.SegmentedOutput.join
def join(self):
    calls["n"] += 1
    if calls["n"] == nth:
        os._exit(137)  # power cut: sealed segment on disk, snapshot written, the join never happens
    return real(self)
seg.SegmentedOutput.join = join
from slotgen.cli import app
sys.argv = ["slotgen"] + sys.argv[2:]
app()
"""


@pytest.mark.parametrize("nth_join", [1, 4, 5])
def test_crash_between_snapshot_and_join_is_completed_by_resume(nth_join, tmp_path, references):
    """The write-ahead join record: the snapshot names the sealed segments; resume joins them first.

    Joins alternate video/lossless per checkpoint: 1 = before the first video join, 4 = after the second
    checkpoint's video join but before its lossless one, 5 = before the third checkpoint's joins."""
    (tmp_path / "story.yaml").write_text(story("sink"))
    (tmp_path / "crash.py").write_text(CRASH_AFTER_SNAPSHOT)
    proc = subprocess.run([sys.executable, "crash.py", str(nth_join), "render", "story.yaml", "-o", "out.mp4",
                           "--lossless", "out.mkv", "-q", "--snapshot-every", "2c"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr
    snap = load_snapshot(default_snapshot_path(tmp_path / "out.mp4"))
    assert snap.video["joins"], snap.video
    assert any(".segment-" in n for n in hidden_files(tmp_path))
    held = assert_resumes_exactly(tmp_path, references("sink"))
    assert held == snap.frames_emitted > 0


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    from slotgen.video.segments import remove_stale

    dead, live = _dead_pid(), os.getppid()
    names = {
        f".out.partial-{dead}-ab12cd.mp4": False,  # an ffmpeg temp file of a killed render
        f".out.segment-{dead}.mkv": False,  # a sealed segment of a killed render
        f"..out.segment-{dead}.partial-{dead}-0a0b0c.mp4": False,  # a segment being written
        f".out.partial-{live}-ab12cd.mp4": True,  # another render of the same output, still running
        f".other.partial-{dead}-ab12cd.mp4": True,  # another output's
        "out.mp4": True,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_stale(tmp_path / "out.mp4")
    assert sorted(Path(r).name for r in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
