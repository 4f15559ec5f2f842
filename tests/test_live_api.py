"""The live server at the API level: tokens, hostile prompts, a viewer that never reads, port in use,
SIGTERM and kill -9 of `slotgen live` (the record re-renders exactly; the last checkpoint resumes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from slotgen.errors import SlotgenError
from slotgen.live.server import check_bind
from slotgen.live.session import MAX_PROMPT_CHARS, LiveSession, check_prompt
from tests.live_helpers import GREEN, STORY, ServerThread, story, wait_for


runner = CliRunner()


@pytest.mark.parametrize("text, needle", [
    ("x" * (10 * 2**20), f"at most {MAX_PROMPT_CHARS} characters"),
    ("a red\ncircle", "control character U+000A"),
    ("a red\x00circle", "control character U+0000"),
    ("a red\u202ecircle", "control character U+202E"),
    ("   ", "must not be empty"),
    (42, "expected text"),
])
def test_hostile_prompts_are_refused_with_one_line(text, needle):
    with pytest.raises(SlotgenError) as e:
        check_prompt(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_port_in_use_and_host_rules_are_one_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(SlotgenError, match=f"port {port} on 127.0.0.1 is in use"):
            check_bind("127.0.0.1", port, None)
        from slotgen.cli import app

        res = runner.invoke(app, ["live", "--port", str(port), "--out", "unused-live-dir"])
        assert res.exit_code == 2
        lines = [l for l in res.output.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: port") and "in use" in lines[0], res.output
        assert not Path("unused-live-dir").exists() or not any(Path("unused-live-dir").iterdir())
    finally:
        busy.close()
    with pytest.raises(SlotgenError, match="needs --token"):
        check_bind("0.0.0.0", 0, None)
    check_bind("0.0.0.0", 0, "a-long-token").close()
    with pytest.raises(SlotgenError, match="at least 8"):
        check_bind("127.0.0.1", 0, "short")


@pytest.mark.slow
def test_tokens_and_hostile_requests_over_http(miniature, tmp_path):
    import websockets.sync.client as wsc
    from websockets.exceptions import InvalidStatus

    session = LiveSession(story(), out=tmp_path / "out", bundle=miniature, realtime=True)
    token = "s3cret-token"
    with ServerThread(session, token=token) as srv, httpx.Client(base_url=srv.base, timeout=30) as http:
        assert http.get("/").status_code == 401
        assert http.get("/api/state", params={"token": "wrong-token"}).status_code == 401
        assert http.get("/static/live.js").status_code == 401
        r = http.post("/api/stop")
        assert r.status_code == 401 and r.json() == {"error": "wrong or missing token"}
        assert http.get("/", params={"token": token}).status_code == 200
        auth = {"Authorization": f"Bearer {token}"}
        assert http.get("/api/state", headers=auth).json()["status"] in ("running", "paused")
        for bad in (f"ws://127.0.0.1:{srv.port}/ws", f"ws://127.0.0.1:{srv.port}/ws?token=nope"):
            with pytest.raises(InvalidStatus):
                wsc.connect(bad, open_timeout=10).close()
        with wsc.connect(f"ws://127.0.0.1:{srv.port}/ws?token={token}", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "state"

        # hostile prompts: one line each, and the render goes on
        before = http.get("/api/state", headers=auth).json()["chunk"]
        huge = json.dumps({"text": "x" * (10 * 2**20)})
        r = http.post("/api/prompt", content=huge, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 413 and "\n" not in r.json()["error"]
        r = http.post("/api/prompt", json={"text": "a red \x1b[31m circle"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"] == "prompt: control character U+001B is not allowed"
        r = http.post("/api/prompt", json={"text": GREEN, "transition": -2}, headers=auth)
        assert r.status_code == 400 and r.json()["error"].startswith("transition:")
        r = http.post("/api/prompt", json={"text": GREEN, "path": "/etc/passwd"}, headers=auth)
        assert r.status_code == 200  # unknown keys are ignored; nothing names a path
        r = http.post("/api/prompt", json={"text": "a glorbulous circle"}, headers=auth)
        assert r.status_code == 200 and "glorbulous" in r.json()["warnings"][0]
        wait_for(lambda: http.get("/api/state", headers=auth).json()["chunk"] > before + 2, what="the render to go on")
        assert http.post("/api/stop", headers=auth).status_code == 200
        wait_for(lambda: session.wait(0), what="the session to stop")
    assert session.status == "stopped"
    texts = [p.text for p in session.record().prompts]
    assert texts[0].startswith("a red circle") and GREEN in texts or "a glorbulous circle" in texts


@pytest.mark.slow
def test_a_viewer_that_never_reads_does_not_stall_the_render(miniature, tmp_path):
    """A WebSocket whose reader never reads (a tiny receive buffer): the render runs at full speed,
    that viewer's queue stays at its bound (old frames dropped) and another viewer gets every frame."""
    import websockets.sync.client as wsc

    session = LiveSession(story(), out=tmp_path / "out", bundle=miniature, realtime=False, snapshot_every=None)
    session.pause()  # both viewers connect before the first chunk
    with ServerThread(session, sndbuf=4096) as srv:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", srv.port))
        # max_queue=1: the client's own reader stops after a message, so the socket is never read again
        with wsc.connect(f"ws://127.0.0.1:{srv.port}/ws", sock=raw, open_timeout=10, max_queue=1), \
                wsc.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=10, max_size=2**22) as good:
            wait_for(lambda: session.broadcast.count() == 2, what="two viewers")
            got = []
            session.resume()
            while len(got) < 180:
                msg = good.recv(timeout=60)
                if isinstance(msg, bytes):
                    got.append(int.from_bytes(msg[:4], "little"))
            viewers = list(session.broadcast.viewers)
            assert got == list(range(180))  # the reading viewer: every frame, in order
            stuck = max(viewers, key=lambda v: v.dropped)
            assert stuck.dropped > 100 and len(stuck.queue) <= stuck.queue.maxlen  # bounded: old frames dropped
            assert session.status == "running"
            session.stop()
            wait_for(lambda: session.wait(0), what="the session to stop")
    assert session.status == "stopped"


def _start_cli(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "story.yaml").write_text(STORY)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slotgen", "live", str(tmp_path / "story.yaml"), "--port", "0",
                             "--out", str(tmp_path / "out"), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("slotgen live: http://127.0.0.1:"), line + proc.stderr.read()
    return proc, line.split()[2]


@pytest.mark.slow
def test_sigterm_saves_and_kill9_leaves_a_resumable_checkpoint(miniature, tmp_path):
    from slotgen.render import render
    from slotgen.resume import resume
    from slotgen.snapshot import load_snapshot
    from slotgen.storyboard import load_storyboard
    from slotgen.video.writer import read_video

    # SIGTERM: stops after the chunk, closes the videos, writes the record and a finished snapshot
    proc, url = _start_cli(tmp_path / "a")
    with httpx.Client(base_url=url, timeout=30) as http:
        wait_for(lambda: http.get("/api/state").json()["chunk"] >= 6, what="six chunks")
        http.post("/api/prompt", json={"text": GREEN, "transition": 0.5})
        wait_for(lambda: len(http.get("/api/state").json()["timeline"]) == 2, what="the typed prompt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130, proc.stderr.read()
    out = tmp_path / "a" / "out"
    sb = load_storyboard(out / "story.yaml")
    assert [p.text for p in sb.prompts][1] == GREEN and sb.prompts[1].transition == 0.5
    render(sb, tmp_path / "re.mkv", bundle=miniature)
    assert np.array_equal(read_video(tmp_path / "re.mkv"), read_video(out / "live.mkv"))
    snap = load_snapshot(out / "snapshot.pt")
    assert snap.complete and snap.frames_emitted == sb.total_frames

    # kill -9 after a checkpoint: snapshot.pt resumes
    proc, url = _start_cli(tmp_path / "b", "--no-realtime", "--snapshot-every", "4c")
    wait_for(lambda: (tmp_path / "b" / "out" / "snapshot.pt").is_file(), what="a checkpoint")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    snap = load_snapshot(tmp_path / "b" / "out" / "snapshot.pt")
    assert not snap.complete
    rep = resume(snap, tmp_path / "more.mkv", bundle=miniature)
    assert rep.frames == snap.total_frames - snap.frames_emitted > 0


def _play(session, typed: dict, chunks: int):
    """Drive ``session`` from its chunk events: submit ``typed[c]`` after chunk c, stop after ``chunks``."""

    def on_event(kind, data):
        if kind == "chunk":
            c = data["chunk"]
            if c in typed:
                session.submit(*typed[c])
            if c + 2 >= session.first_chunk + chunks:
                session.stop()

    session.on_event = on_event
    session.start()
    assert session.wait(120) and session.status == "stopped", session.error


@pytest.mark.slow
def test_live_resume_continues_the_record_exactly(miniature, tmp_path):
    """A session, then `live --resume` of its snapshot with another typed prompt: the second record is the
    whole story, and it re-renders to the first session's frames followed by the second's."""
    from slotgen.render import render
    from slotgen.video.writer import read_video
    from tests.live_helpers import YELLOW

    a = LiveSession(story(), out=tmp_path / "a", bundle=miniature, realtime=False, snapshot_every=None)
    _play(a, {1: (GREEN, 0.25, "linear")}, chunks=5)
    b = LiveSession(out=tmp_path / "b", bundle=miniature, resume=tmp_path / "a" / "snapshot.pt", realtime=False,
                    snapshot_every=None)
    assert b.first_chunk == 5 and b.entries[-1].text == GREEN
    _play(b, {6: (YELLOW, 0.0, "linear")}, chunks=5)
    rec = b.record()
    assert [p.text for p in rec.prompts][1:] == [GREEN, YELLOW] and rec.prompts[1].transition == 0.25
    assert [round(p.start * 16) for p in rec.prompts] == [0, 6, 21]  # chunks 2 and 7 (retaken), 3 frames each
    render(rec, tmp_path / "whole.mkv", bundle=miniature)
    live = np.concatenate([read_video(tmp_path / "a" / "live.mkv"), read_video(tmp_path / "b" / "live.mkv")])
    assert len(live) == 30 and np.array_equal(read_video(tmp_path / "whole.mkv"), live)


@pytest.mark.slow
def test_closing_the_last_page_stops_and_saves(miniature, tmp_path):
    import websockets.sync.client as wsc

    session = LiveSession(story(), out=tmp_path / "out", bundle=miniature, realtime=True, snapshot_every=None)
    with ServerThread(session, idle_stop=0.5) as srv:
        with wsc.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=10) as ws:
            while not isinstance(ws.recv(timeout=30), bytes):  # a frame arrived
                pass
        wait_for(lambda: session.wait(0), timeout=60, what="the session to stop after the page closed")
    assert session.status == "stopped"
    assert all(p.is_file() for p in session.paths().values())


def test_cli_usage_errors_are_one_line_before_anything_loads(tmp_path, monkeypatch):
    from slotgen.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(STORY)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "story.yaml").write_text("x")
    cases = [
        (["live", "s.yaml", "--resume", "snap.pt"], "either a storyboard or --resume"),
        (["live", "s.yaml", "--out", "taken"], "already holds a live session"),
        (["live", "s.yaml", "--host", "0.0.0.0"], "needs --token"),
        (["live", "s.yaml", "--snapshot-every", "soon"], "--snapshot-every"),
        (["live", "missing.yaml"], "storyboard file not found"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, args)
        lines = [l for l in res.output.splitlines() if l.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            (args, res.output)
