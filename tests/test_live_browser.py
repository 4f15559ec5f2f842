"""The live page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): frames arrive,
two typed prompts (one with a transition) take effect at chunk boundaries, a snapshot, stop; then the
record re-renders to the live frames exactly and the snapshot continues the story."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.live_helpers import GREEN, STORY, YELLOW

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")]


def start_live(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    (tmp_path / "story.yaml").write_text(STORY)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slotgen", "live", str(tmp_path / "story.yaml"), "--port", "0",
                             "--out", str(tmp_path / "out"), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("slotgen live: http://127.0.0.1:"), line + proc.stderr.read()
    return proc, line.split()[2]


def test_browser_directs_records_rerenders_and_resumes(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from slotgen.engine.generator import ChunkGeometry
    from slotgen.models import load_model
    from slotgen.render import render
    from slotgen.resume import extend_storyboard, resume
    from slotgen.snapshot import load_snapshot
    from slotgen.storyboard import load_storyboard
    from slotgen.video.writer import read_video

    proc, url = start_live(tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("window.slotgenLive.framesDrawn > 10", timeout=60_000)
            expect(page.locator("#current")).to_have_text(re.compile("a red circle"))
            expect(page.locator("#memory tbody tr")).to_have_count(4)  # the miniature's layers
            # first prompt: a 0.5 s slerp transition
            page.fill("#transition", "0.5")
            page.select_option("#blend", "slerp")
            page.fill("#prompt", GREEN)
            page.press("#prompt", "Enter")
            expect(page.locator("#current")).to_have_text(GREEN, timeout=30_000)
            page.wait_for_function("window.slotgenLive.latencies.length >= 1", timeout=30_000)
            # second prompt: a cut
            page.fill("#transition", "0")
            page.fill("#prompt", YELLOW)
            page.click("#send")
            expect(page.locator("#current")).to_have_text(YELLOW, timeout=30_000)
            expect(page.locator("#timeline li")).to_have_count(3)
            page.click("#snapshot")
            expect(page.locator("#message")).to_have_text(re.compile(r"snapshot written: snapshot-\d+\.pt"),
                                                          timeout=30_000)
            page.wait_for_function("window.slotgenLive.latencies.length >= 2", timeout=30_000)
            latencies = page.evaluate("window.slotgenLive.latencies")
            drawn = page.evaluate("window.slotgenLive.framesDrawn")
            page.click("#stop")
            expect(page.locator("#status")).to_have_text("stopped", timeout=60_000)
            browser.close()
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert drawn > 10 and all(l["ms"] > 0 for l in latencies)

    out = tmp_path / "out"
    bundle = load_model("miniature")
    geo = ChunkGeometry(bundle.settings.chunk_frames, bundle.settings.vae_stride_t)
    sb = load_storyboard(out / "story.yaml")
    assert [p.text for p in sb.prompts] == [sb.prompts[0].text, GREEN, YELLOW]
    assert (sb.prompts[1].transition, sb.prompts[1].blend, sb.prompts[2].transition) == (0.5, "slerp", 0.0)
    starts = {geo.first_frame(c) / sb.fps: c for c in range(geo.num_chunks(sb.total_frames) + 1)}
    for p in sb.prompts:
        assert p.start in starts  # every prompt starts on a chunk's first frame: where it took effect
    assert [l["frame"] for l in latencies] == [round(p.start * sb.fps) for p in sb.prompts[1:]]
    assert sb.total_frames == geo.first_frame(geo.num_chunks(sb.total_frames))  # whole chunks

    # the offline lossless re-render of the record is the live video, frame for frame
    render(sb, tmp_path / "offline.mkv", bundle=bundle)
    live = read_video(out / "live.mkv")
    assert len(live) == sb.total_frames
    assert np.array_equal(read_video(tmp_path / "offline.mkv"), live)

    # the snapshot at the end continues the story: resume == the extended story rendered in one go
    snap = load_snapshot(out / "snapshot.pt")
    assert snap.complete and snap.frames_emitted == sb.total_frames
    resume(snap, tmp_path / "more.mkv", prompt=GREEN, duration=0.75, bundle=bundle)
    render(extend_storyboard(sb, prompt=GREEN, duration=0.75), tmp_path / "whole.mkv", bundle=bundle)
    whole = read_video(tmp_path / "whole.mkv")
    assert np.array_equal(np.concatenate([live, read_video(tmp_path / "more.mkv")]), whole)

    # the snapshot taken from the page holds the story up to its frame and resumes too
    (taken,) = sorted(out.glob("snapshot-*.pt"))
    mid = load_snapshot(taken)
    assert mid.complete and mid.frames_emitted == int(taken.stem.split("-")[1])
    assert mid.frames_emitted < sb.total_frames
