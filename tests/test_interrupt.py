"""Nothing is lost on interruption: SIGINT/SIGTERM mid-render finishes the chunk, closes a playable video
with every frame so far, writes a snapshot, prints the resume command and exits 130; resuming gives the
frames of an uninterrupted render bit for bit."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.engine.generator import ChunkGeometry
from slotgen.render import InterruptGuard, render
from slotgen.snapshot import default_snapshot_path, load_snapshot
from slotgen.storyboard import parse_storyboard
from slotgen.video.writer import probe_video, read_video

STORY = """\
fps: 16
resolution: 32x32
sampler: {steps: 2}
seed: 3
memory: {policy: sink, sink: 2, window: 4}
duration: 4
prompts:
  - prompt: a red circle moves right on a blue background
  - at: 2
    prompt: a green square enters from the left on a white background
"""
TOTAL = 64
runner = CliRunner()


@pytest.fixture(scope="module")
def reference(miniature, tmp_path_factory):
    """The uninterrupted render's exact frames."""
    out = tmp_path_factory.mktemp("ref") / "ref.mkv"
    render(parse_storyboard(STORY, "story.yaml"), out, bundle=miniature)
    frames = read_video(out)
    assert len(frames) == TOTAL
    return frames


def _stderr(res) -> str:
    try:
        return res.stderr
    except (ValueError, AttributeError):
        return res.output


def _interrupted_render(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, str]:
    """`python -m slotgen render` in a subprocess, signalled once the first chunk is done.

    SIGINT goes to the whole process group, as a terminal's Ctrl-C does (the ffmpeg writers must survive
    it); SIGTERM to the process only, as `kill` does.
    """
    (tmp_path / "story.yaml").write_text(STORY)
    env = dict(os.environ, SLOTGEN_DEBUG_CHUNKS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "slotgen", "render", "story.yaml", "-o", "out.mp4", "--lossless", "out.mkv", "--quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stderr:  # wait for the first finished chunk
            lines.append(line)
            if line.startswith("slotgen-chunk "):
                if sig == signal.SIGINT:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "".join(lines)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, "".join(lines) + err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_render_keeps_every_frame_and_resumes_exactly(sig, tmp_path, reference, miniature, monkeypatch):
    proc, err = _interrupted_render(tmp_path, sig)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "finishing the current chunk" in err
    # a playable MP4 and an exact lossless copy of every frame so far; no temporary files left
    n = probe_video(tmp_path / "out.mp4")["frames"]
    geo = ChunkGeometry(miniature.settings.chunk_frames, miniature.settings.vae_stride_t)
    ends = {geo.first_frame(c) for c in range(1, geo.num_chunks(TOTAL) + 1)}
    assert 0 < n < TOTAL and n in ends, err  # whole chunks
    partial_mp4 = read_video(tmp_path / "out.mp4")
    assert len(partial_mp4) == n
    partial = read_video(tmp_path / "out.mkv")
    assert np.array_equal(partial, reference[:n])
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    # the snapshot beside it
    snap_path = default_snapshot_path(tmp_path / "out.mp4")
    snap = load_snapshot(snap_path)
    assert snap.interrupted and snap.frames_emitted == n and not snap.complete
    assert snap.video["path"] == str((tmp_path / "out.mp4").resolve())
    # the printed command resumes it (in place: out.mp4 becomes the whole video)
    cmd_line = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert len(cmd_line) == 1, err
    cmd = shlex.split(cmd_line[0][len("resume with: "):])
    assert cmd[:3] == ["slotgen", "resume", "out.mp4.snapshot.pt"], cmd
    assert "--append" in cmd and cmd[cmd.index("--lossless") + 1] == "out.mkv"  # every output continues
    import slotgen.render

    monkeypatch.setattr(slotgen.render, "load_model", lambda *a, **k: miniature)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, cmd[1:] + ["--quiet"])
    assert res.exit_code == 0, _stderr(res)
    assert np.array_equal(read_video("out.mkv"), reference)  # the lossless copy was extended, bit-exact
    assert probe_video("out.mp4")["frames"] == TOTAL
    assert np.array_equal(read_video("out.mp4")[:n], partial_mp4)  # the original frames, stream-copied
    done = load_snapshot(snap_path)  # rewritten by --snapshot: now at the end of the story
    assert done.complete and done.frames_emitted == TOTAL and not done.interrupted


def test_should_stop_in_the_library(tmp_path, reference, miniature):
    """render(should_stop=...) stops after the current chunk and snapshots to <output>.snapshot.pt."""
    chunks = []
    rep = render(parse_storyboard(STORY, "story.yaml"), tmp_path / "o.mkv", bundle=miniature,
                 on_chunk=lambda ev: chunks.append(ev.chunk), should_stop=lambda: len(chunks) >= 2)
    two = ChunkGeometry(miniature.settings.chunk_frames, miniature.settings.vae_stride_t).first_frame(2)
    assert rep.interrupted and rep.frames == two and chunks == [0, 1]
    assert rep.snapshot == str(tmp_path / "o.mkv.snapshot.pt")
    assert np.array_equal(read_video(tmp_path / "o.mkv"), reference[:two])
    assert load_snapshot(rep.snapshot).frames_emitted == two


def test_guard_installs_handlers_only_inside_and_restores_them():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    with InterruptGuard(seen.append) as guard:
        assert signal.getsignal(signal.SIGTERM) == guard._handle
        assert not guard()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert guard() and guard.signum == signal.SIGTERM and seen == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):  # a second signal aborts
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert {s: signal.getsignal(s) for s in before} == before
