"""``slotgen bench speed``: wall time, generation fps, per-chunk latency and peak memory per policy.

Each (policy, duration) runs in its own subprocess, so peak RSS is that run's own; all runs share the
storyboard, seed and therefore the noise. The storyboard is the LongLive/MemFlow protocol scaled to the
requested duration: six equal prompt segments (five switches), each restating subject and setting.

Numbers reported per run:
  wall_s            total wall time including model load-free streaming decode and MP4 writing
  realtime_x        video seconds / wall seconds (≥ 2 means twice real time)
  gen_fps           pixel frames produced per wall second (the way LongLive counts)
  chunk_ms_median / chunk_ms_p95
  drift             median chunk latency of the last minute / of the first minute (flat ⇒ ≈ 1.0)
  peak_rss_mb       ru_maxrss of the worker process; peak_gpu_mb on CUDA
  rss_growth        resident memory after the last chunk / after the first minute of chunks (same
                    process, so allocator noise between runs cancels; bounded memory ⇒ ≈ 1.0)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PROMPTS = [
    "a red circle moves right on a blue background",
    "a red circle moves left on a blue background",
    "a red circle stays in the center on a blue background",
    "a green square enters from the right on a blue background",
    "a green square and a red circle move up on a blue background",
    "a red circle leaves the frame on a blue background",
]


def memory_spec(spec: str) -> dict:
    """A run's memory from ``POLICY[@PRESET][:KEY=VALUE...]``, e.g. ``sink``, ``sink@longlive``,
    ``sink:window=6`` or ``bank@memflow:write_every=1`` (values as in a storyboard)."""
    head, *pairs = spec.split(":")
    policy, _, preset = head.partition("@")
    memory: dict = {"policy": policy}
    if preset:
        memory["preset"] = preset
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"{spec!r}: expected KEY=VALUE after ':', got {pair!r}")
        memory[key] = value
    return memory


def bench_storyboard_yaml(duration: float, policy: str, model: str, resolution: str | None, fps: int | None,
                          seed: int = 0, steps: int | None = None) -> str:
    """Six equal prompt segments over ``duration`` seconds (LongLive's interactive protocol, scaled).
    ``policy``: a :func:`memory_spec`."""
    seg = duration / len(PROMPTS)
    lines = [f"title: speed benchmark ({policy})", f"duration: {duration}", f"seed: {seed}", f"model: {json.dumps(model)}",
             f"memory: {json.dumps(memory_spec(policy))}"]
    if fps:
        lines.append(f"fps: {fps}")
    if resolution:
        lines.append(f"resolution: {resolution}")
    if steps:
        lines.append(f"sampler:\n  steps: {steps}")
    lines.append("prompts:")
    for i, p in enumerate(PROMPTS):
        lines.append(f"  - at: {round(i * seg, 6)}\n    prompt: {p}")
    return "\n".join(lines) + "\n"


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def resident_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_worker(policy: str, duration: float, model: str, device: str, resolution: str | None, fps: int | None,
               chunks: int | None, steps: int | None) -> dict:
    """One measured render in this process (called inside the subprocess)."""
    import torch

    from slotgen.models import load_model
    from slotgen.render import Renderer
    from slotgen.storyboard import parse_storyboard
    from slotgen.video.writer import open_writer

    from slotgen.preflight import apply_cpu_threads

    apply_cpu_threads(torch.device(device), None)  # as `slotgen render` does, unless OMP_NUM_THREADS is set
    bundle = load_model(model, device=device)
    fps_eff = fps or bundle.settings.fps
    if chunks:  # exactly `chunks` chunks of video
        F, s = bundle.settings.chunk_frames, bundle.settings.vae_stride_t
        frames = 1 + s * (F - 1) + s * F * (chunks - 1)
        duration = frames / fps_eff
    sb = parse_storyboard(bench_storyboard_yaml(duration, policy, model, resolution, fps, steps=steps), "<bench>")
    renderer = Renderer(sb, bundle=bundle, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    per_min = max(1, round(60 * sb.fps / (bundle.settings.vae_stride_t * bundle.settings.chunk_frames)))
    rss: dict[str, float] = {}

    def on_chunk(ev) -> None:
        if ev.chunk + 1 == per_min:
            rss["first_min"] = resident_mb()
        rss["end"] = resident_mb()

    with tempfile.TemporaryDirectory() as tmp:
        writer = open_writer(Path(tmp) / "bench.mp4", sb.fps, renderer.size)
        t0 = time.perf_counter()
        report = renderer.stream([writer], on_chunk=on_chunk)
        writer.close()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    lat = report.chunk_seconds
    first, last = lat[1 : 1 + per_min], lat[-per_min:]  # chunk 0 is shorter and warms caches
    out = {
        "policy": policy,
        "model": bundle.name,
        "device": device,
        "resolution": f"{renderer.size[0]}x{renderer.size[1]}",
        "video_s": report.frames / sb.fps,
        "frames": report.frames,
        "chunks": report.chunks,
        "wall_s": wall,
        "realtime_x": (report.frames / sb.fps) / wall,
        "gen_fps": report.frames / wall,
        "chunk_ms_median": 1000 * statistics.median(lat),
        "chunk_ms_p95": 1000 * percentile(lat, 0.95),
        "drift": (statistics.median(last) / statistics.median(first)) if len(lat) > 2 * per_min else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth": (rss["end"] / rss["first_min"]) if "first_min" in rss and len(lat) > per_min else None,
        "memory_bytes": renderer.policy.nbytes(),
    }
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


_WORKER = ("import json, sys; from slotgen.bench.speed import run_worker; "
           "print(json.dumps(run_worker(**json.loads(sys.argv[1]))))")  # one JSON argument, one JSON line out


def run_speed_bench(policies: list[str], durations: list[float], model: str = "miniature", device: str = "cpu",
                    resolution: str | None = None, fps: int | None = None, chunks: int | None = None,
                    steps: int | None = None, isolate: bool = True, repeat: int = 1,
                    on_item: Callable[[str], None] | None = None) -> list[dict]:
    """Run every (policy, duration) — each in a fresh subprocess when ``isolate`` — and return rows.

    ``repeat`` > 1 runs the whole list that many times, interleaved (A B C A B C ...), so that load from
    other processes on a shared machine hits every policy alike; a row then reports the median over the
    repeats of each number (``chunk_ms_median``: median of the runs' medians) and ``repeats``.
    ``on_item(label)`` is called as each run starts (a progress display)."""
    rows = []
    for duration in durations:
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        for _ in range(repeat):
            for policy in policies:
                args = dict(policy=policy, duration=duration, model=model, device=device, resolution=resolution,
                            fps=fps, chunks=chunks, steps=steps)
                if on_item is not None:
                    on_item(f"{policy}, {duration:g} s")
                if not isolate:
                    runs[policy].append(run_worker(**args))
                    continue
                proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(args)],
                                      capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark worker failed for {policy}:\n{proc.stderr[-2000:]}")
                runs[policy].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for policy in policies:
            rows.append(_median_row(runs[policy]))
    return rows


def _median_row(runs: list[dict]) -> dict:
    """One row from repeated runs of the same configuration: the median of every number."""
    if len(runs) == 1:
        return {**runs[0], "repeats": 1}
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
    row["repeats"] = len(runs)
    return row
