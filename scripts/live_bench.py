"""Benchmark `slotgen live` (a command, not a test): prompt-to-frame latency and frames/s streamed vs `render`.

Starts `slotgen live STORY --port 0` twice (real time, then --no-realtime), drives the page in headless
Chromium (Debian's /usr/bin/chromium through Playwright) and reads what the page itself measures:

* latency: from submitting a typed prompt to drawing the first frame generated under it (the page's
  ``window.slotgenLive.latencies``), over ``--prompts`` prompts sent at random moments within a chunk;
* latency without the page: from ``LiveSession.submit`` to the first frame under the prompt reaching
  the server's broadcaster, in this process (the page's HTTP, WebSocket and drawing left out), and the
  medians of its parts (:func:`session_latencies`);
* frames/s streamed: frames drawn per second of wall time over ``--seconds`` with --no-realtime;
* `render` frames/s: the same storyboard rendered by :func:`slotgen.render.render` for as many frames
  (model already loaded, so neither number counts the load), and its wall time per chunk (decode
  overlapped with the next chunk's generation);
* one chunk + its decode, the latency target: the median over 23 chunks (the first excluded) of one
  chunk generated and then decoded on the same thread (a `Renderer` with ``overlap=False``), measured
  just before and just after the latency run (the machine may be shared); and the same for a
  *switch* chunk, whose prompt differs from the previous chunk's (its KV re-cache included), as the
  first chunk under a typed prompt is.

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


def session_latencies(story: str, out: Path, prompts: int, rng: random.Random,
                      bundle) -> tuple[list[float], list[dict]]:
    """Latency without the page: from ``LiveSession.submit`` to the first frame generated under the
    prompt reaching the broadcaster (what the server sends), in real time, in this process. Also its
    breakdown per prompt (seconds): ``start`` from the submit to the start of the attempt at the chunk
    under the prompt that is kept (a retake restores the memory first; at a chunk boundary the render
    may be finishing a chunk or waiting for the clock), ``recache`` the KV re-cache of that attempt,
    ``denoise`` from there to the chunk's latents being final (the sampler's steps; with an engine that
    decodes before the commit pass, to the hand-over to the decoder, else to the end of the commit
    pass), ``first_frame`` from there to the first frame under the prompt reaching the broadcaster
    (decoding, and the previous chunk's frames still queued)."""
    from slotgen.live import LiveSession
    from slotgen.storyboard import load_storyboard

    session = LiveSession(load_storyboard(story), out=out, bundle=bundle, realtime=True, snapshot_every=None)
    engine = session.renderer.engine
    written: list[tuple[float, int, int]] = []  # (time, first frame, frames) of every write to the page
    attempts: list[dict] = []  # per generate_chunk call: chunk, start, recache (t0, t1), latents final
    write, generate, recache = session.broadcast.write, engine.generate_chunk, engine._recache

    def timed(frames):
        written.append((time.monotonic(), session.renderer.frames_emitted, len(frames)))
        return write(frames)

    def timed_generate(*args, **kwargs):
        a = {"chunk": engine.next_chunk, "start": time.monotonic(), "recache": None, "final": None}
        attempts.append(a)
        sampled = kwargs.get("on_sampled")
        if sampled is not None:
            def on_sampled(chunk, latents):
                a["final"] = time.monotonic()
                return sampled(chunk, latents)
            kwargs["on_sampled"] = on_sampled
        res = generate(*args, **kwargs)
        if a["final"] is None:
            a["final"] = time.monotonic()
        return res

    def timed_recache(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return recache(*args, **kwargs)
        finally:
            attempts[-1]["recache"] = (t0, time.monotonic())

    session.broadcast.write, engine.generate_chunk, engine._recache = timed, timed_generate, timed_recache
    session.start()
    out_lat, parts = [], []
    try:
        time.sleep(2.0)
        for i in range(prompts):
            time.sleep(0.5 + rng.random() * 0.7)
            t = time.monotonic()
            session.submit(PROMPTS[i % len(PROMPTS)])
            deadline = t + 60
            while time.monotonic() < deadline:
                took = [e for e in session.entries if e.source == "typed" and e.submitted and e.submitted >= t]
                first = session.geometry.first_frame(took[0].chunk) if took else None
                hit = [w for w in list(written) if first is not None and w[0] >= t and w[1] + w[2] > first]
                if hit:
                    out_lat.append(hit[0][0] - t)
                    kept = [a for a in attempts if a["chunk"] == took[0].chunk and a["final"] is not None]
                    if kept:
                        a = kept[-1]
                        r0, r1 = a["recache"] or (a["start"], a["start"])
                        parts.append({"start": a["start"] - t, "recache": r1 - r0, "denoise": a["final"] - r1,
                                      "first_frame": hit[0][0] - a["final"]})
                    break
                time.sleep(0.002)
    finally:
        session.stop()
        session.wait()
    return out_lat, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--story", default=str(ROOT / "storyboards" / "demo.yaml"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the moments the prompts are sent at")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    load_start = os.getloadavg()

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
        from slotgen.engine.generator import ChunkGeometry
        from slotgen.models import load_model
        from slotgen.render import Renderer, render, stream_to_files
        from slotgen.storyboard import load_storyboard

        sb = load_storyboard(args.story)
        bundle = load_model(sb.model)
        geo = ChunkGeometry(bundle.settings.chunk_frames, bundle.settings.vae_stride_t)

        def chunk_plus_decode(name: str, switch: bool) -> float:  # one chunk generated, then decoded, on one thread
            texts = [sb.prompts[0].text, PROMPTS[0]]  # switch: the prompt changes at every chunk (a re-cache each)
            prompts = [{"at": geo.first_frame(c) / sb.fps, "prompt": texts[c % 2 if switch else 0]} for c in range(24)]
            short = sb.with_overrides(duration=geo.first_frame(24) / sb.fps, prompts=prompts if switch else prompts[:1])
            rep = stream_to_files(Renderer(short, bundle=bundle, overlap=False), Path(tmp) / name, snapshot_every=None)
            return statistics.median(rep.chunk_seconds[1:])

        # the machine may be shared: the targets are measured just before and just after the latency run
        target = {"chunk_plus_decode_s": [chunk_plus_decode("a.mkv", False)],
                  "switch_chunk_plus_decode_s": [chunk_plus_decode("b.mkv", True)]}
        lat = drive(args.story, Path(tmp) / "a", [], latencies)
        lat_session, parts = session_latencies(args.story, Path(tmp) / "s", args.prompts, random.Random(args.seed),
                                               bundle)
        target["chunk_plus_decode_s"].append(chunk_plus_decode("c.mkv", False))
        target["switch_chunk_plus_decode_s"].append(chunk_plus_decode("d.mkv", True))
        fps_live, frames = drive(args.story, Path(tmp) / "b", ["--no-realtime"], throughput)

        n = max(frames, geo.first_frame(4))
        long = sb.with_overrides(duration=n / sb.fps, prompts=[{"at": 0, "prompt": sb.prompts[0].text}])
        t = time.perf_counter()
        rep = render(long, Path(tmp) / "r.mkv", bundle=bundle, snapshot_every=None)
        seconds = time.perf_counter() - t
    fps_render = rep.frames / seconds
    chunk = seconds / rep.chunks  # the period of `render`: decode overlapped with generation
    out = {
        "story": args.story, "chunk_video_seconds": geo.video_frames(1) / sb.fps,
        **{name: {"median": statistics.median(x), "max": max(x), "min": min(x), "n": len(x)}
           for name, x in (("latency_s", lat), ("latency_without_page_s", lat_session))},
        "latency_without_page_breakdown_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]} if parts
        else None,
        "render_seconds_per_chunk": chunk,
        **{k: {"before": v[0], "after": v[1]} for k, v in target.items()},
        "fps_streamed": fps_live, "fps_render": fps_render, "frames_streamed": frames,
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
