"""Benchmark `slotgen live` (a command, not a test): prompt-to-frame latency and frames/s streamed vs `render`.

Starts `slotgen live STORY --port 0` twice (real time, then --no-realtime), drives the page in headless
Chromium (Debian's /usr/bin/chromium through Playwright) and reads what the page itself measures:

* latency: from submitting a typed prompt to drawing the first frame generated under it (the page's
  ``window.slotgenLive.latencies``), over ``--prompts`` prompts sent at random moments within a chunk;
* frames/s streamed: frames drawn per second of wall time over ``--seconds`` with --no-realtime;
* `render` frames/s: the same storyboard rendered by :func:`slotgen.render.render` for as many frames
  (model already loaded, so neither number counts the load), and the time of one chunk + its decode.

    python scripts/live_bench.py [--story storyboards/demo.yaml] [--prompts 8] [--seconds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PROMPTS = ["a yellow star moves up on a purple background", "a green square enters from the left on a white background",
           "a red circle moves right on a blue background"]


def drive(story: str, out: Path, extra: list[str], fn):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "slotgen", "live", story, "--port", "0", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, text=True, env=env)
    from playwright.sync_api import sync_playwright

    try:
        url = proc.stdout.readline().split()[2]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("window.slotgenLive.framesDrawn > 12", timeout=120_000)
            result = fn(page)
            page.click("#stop")
            page.wait_for_function("window.slotgenLive.state && window.slotgenLive.state.status == 'stopped'",
                                   timeout=120_000)
            browser.close()
        proc.wait(60)
        return result
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--story", default=str(ROOT / "storyboards" / "demo.yaml"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the moments the prompts are sent at")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    def latencies(page):
        for i in range(args.prompts):
            page.wait_for_timeout(500 + rng.random() * 700)
            page.fill("#prompt", PROMPTS[i % len(PROMPTS)])
            page.press("#prompt", "Enter")
            page.wait_for_function(f"window.slotgenLive.latencies.length >= {i + 1}", timeout=120_000)
        return [x["ms"] / 1000 for x in page.evaluate("window.slotgenLive.latencies")]

    def throughput(page):
        f0, t0 = page.evaluate("window.slotgenLive.framesDrawn"), time.monotonic()
        page.wait_for_timeout(args.seconds * 1000)
        f1, t1 = page.evaluate("window.slotgenLive.framesDrawn"), time.monotonic()
        return (f1 - f0) / (t1 - t0), f1 - f0

    with tempfile.TemporaryDirectory() as tmp:
        lat = drive(args.story, Path(tmp) / "a", [], latencies)
        fps_live, frames = drive(args.story, Path(tmp) / "b", ["--no-realtime"], throughput)

        from slotgen.engine.generator import ChunkGeometry
        from slotgen.models import load_model
        from slotgen.render import render
        from slotgen.storyboard import load_storyboard

        sb = load_storyboard(args.story)
        bundle = load_model(sb.model)
        geo = ChunkGeometry(bundle.settings.chunk_frames, bundle.settings.vae_stride_t)
        n = max(frames, geo.first_frame(4))
        long = sb.with_overrides(duration=n / sb.fps, prompts=[{"at": 0, "prompt": sb.prompts[0].text}])
        t = time.perf_counter()
        rep = render(long, Path(tmp) / "r.mkv", bundle=bundle, snapshot_every=None)
        seconds = time.perf_counter() - t
    fps_render = rep.frames / seconds
    chunk = seconds / rep.chunks  # one chunk generated + decoded, as `render` streams it
    out = {
        "story": args.story, "chunk_video_seconds": geo.video_frames(1) / sb.fps,
        "latency_s": {"median": statistics.median(lat), "max": max(lat), "min": min(lat), "n": len(lat)},
        "render_chunk_plus_decode_s": chunk,
        "fps_streamed": fps_live, "fps_render": fps_render, "frames_streamed": frames,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
